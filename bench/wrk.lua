-- wrk script for the Latchkey benchmarks.
--
--   wrk ... -s bench/wrk.lua URL -- get [HEADERS_FILE]
--       GET the URL's path on every request (the bare /healthz baseline). HEADERS_FILE, if
--       given, holds `Name: value` lines sent with every request (bench/proxy.py puts the
--       bearer tokens there, so that they appear on no command line and in no log).
--   wrk ... -s bench/wrk.lua URL -- post BODIES_FILE
--       POST one pre-signed, form-encoded body per request. BODIES_FILE has one body a line;
--       each body carries a single-use subject JWT (`jti`), so no line may be sent twice.
--       Thread i of N walks only its own disjoint slice of the file. A thread that has used up
--       its slice keeps going with the last body (a replay, answered 400) and counts it under
--       `exhausted`, so the harness can tell a too-small batch from a server error.
--
-- done() prints one line `WRKJSON {...}` that the harness parses (latencies in microseconds).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state). The counters are globals so
-- that done(), which runs in the main state, can read them with thread:get().
local mode = "get"
local bodies = {}
local last = 0
local path = "/"
local get_request = nil
first, pos = 1, 1
non200 = 0
exhausted = 0
responses = 0

function init(args)
  mode = args[1] or "get"
  path = wrk.path
  if mode == "get" then
    local headers = {}
    if args[2] then
      local file = assert(io.open(args[2], "r"), "cannot open headers file")
      for line in file:lines() do
        local name, value = string.match(line, "^([^:]+):%s*(.-)%s*$")
        if name then headers[name] = value end
      end
      file:close()
    end
    -- The same request every time: formatted once per thread.
    get_request = wrk.format("GET", path, headers)
  elseif mode == "post" then
    local file = assert(io.open(args[2], "r"), "cannot open bodies file")
    for line in file:lines() do
      if #line > 0 then bodies[#bodies + 1] = line end
    end
    file:close()
    local nthreads = tonumber(args[3]) or 1
    local per = math.floor(#bodies / nthreads)
    first = id * per + 1
    last = first + per - 1
    pos = first
  end
end

function request()
  if mode ~= "post" then
    return get_request
  end
  local body
  if pos <= last then
    body = bodies[pos]
    pos = pos + 1
  else
    body = bodies[last]
    exhausted = exhausted + 1
  end
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/x-www-form-urlencoded",
  }, body)
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then
    non200 = non200 + 1
    if non200 <= 3 then
      io.stderr:write(string.format("non-200 (%d): %s\n", status, string.sub(body or "", 1, 300)))
    end
  end
end

function done(summary, latency, requests)
  local n200, nexh, nresp, used = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    n200 = n200 + (t:get("non200") or 0)
    nexh = nexh + (t:get("exhausted") or 0)
    nresp = nresp + (t:get("responses") or 0)
    local p, f = t:get("pos"), t:get("first")
    if p and f then used = used + (p - f) end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"responses_seen": %d, "non200": %d, "exhausted": %d, "bodies_used": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d, ' ..
    '"lat_mean_us": %.1f, "lat_max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    nresp, n200, nexh, used,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
