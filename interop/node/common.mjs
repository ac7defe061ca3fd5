// What the Node interop drivers share: required inputs from the environment, and a passive spy
// on fetch that records what an SDK sends to Latchkey (secrets never recorded).

// The environment variable `name`; throws if it is unset or empty.
export const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};

// Replace globalThis.fetch with a spy that forwards every call untouched and records its method,
// path, content type, auth scheme and parameters (the names in `secrets` shown as "<secret>");
// with `answers`, also the response's status and, for errors, its `error`. Returns the record.
export const spyOnFetch = ({ secrets, answers = false }) => {
  const sent = [];
  const secret = new Set(secrets);
  const realFetch = globalThis.fetch;
  globalThis.fetch = async (input, init = {}) => {
    const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
    const entry = { method: init.method ?? "GET", path: url.pathname, contentType: headers.get("content-type") };
    if (headers.has("authorization")) entry.authorization = headers.get("authorization").split(" ")[0];
    if (init.body !== undefined && init.body !== null) {
      const text = String(init.body);
      let params;
      try {
        params = entry.contentType?.startsWith("application/json")
          ? JSON.parse(text)
          : Object.fromEntries(new URLSearchParams(text));
      } catch {
        params = {};
      }
      entry.params = Object.fromEntries(
        Object.entries(params).map(([k, v]) => [k, secret.has(k) ? "<secret>" : v]),
      );
    }
    sent.push(entry);
    const response = await realFetch(input, init);
    if (answers) {
      entry.status = response.status;
      if (!response.ok) {
        try {
          entry.error = (await response.clone().json()).error;
        } catch {
          // not JSON: the status says enough
        }
      }
    }
    return response;
  };
  return sent;
};
