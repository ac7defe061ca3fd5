//! The two HTML pages the provider renders: consent and error.
//!
//! Everything interpolated is escaped, there is no script at all, and the headers forbid
//! framing (a consent page inside someone else's frame is a clickjacking target) and caching.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::scope::{ScopeSet, describe};

/// Escape text for HTML element content and double- or single-quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#222}\
h1{font-size:1.3rem}li{margin:.4rem 0}code{background:#f1f1f1;padding:0 .2rem}\
.actions{display:flex;gap:1rem;margin-top:1.5rem}button{font-size:1rem;padding:.5rem 1.2rem;cursor:pointer}\
.muted{color:#666;font-size:.9rem}";

/// `body` must already be escaped.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>\n",
        title = escape(title),
    );
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'",
                ),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        html,
    )
        .into_response()
}

/// The consent page. The form carries only the opaque ticket and the decision; everything
/// else was validated and stored server-side when the page was rendered.
pub(crate) fn consent(
    client_id: &str,
    account: &str,
    scopes: ScopeSet,
    redirect_uri: &str,
    ticket: &str,
) -> Response {
    let items: String = scopes
        .names()
        .map(|s| {
            format!(
                "<li><code>{}</code> — {}</li>",
                escape(s),
                escape(describe(s))
            )
        })
        .collect();
    let body = format!(
        "<h1>Authorize {client} to access {account}</h1>\
         <p>Demo provider. <strong>{client}</strong> is asking for:</p><ul>{items}</ul>\
         <form method=\"post\" action=\"authorize\">\
         <input type=\"hidden\" name=\"consent\" value=\"{ticket}\">\
         <div class=\"actions\">\
         <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\
         </div></form>\
         <p class=\"muted\">You will be sent back to <code>{redirect}</code>.</p>",
        client = escape(client_id),
        account = escape(account),
        ticket = escape(ticket),
        redirect = escape(redirect_uri),
    );
    page(StatusCode::OK, "Authorize access — demo provider", &body)
}

/// An error shown to the user instead of redirecting (the redirect target is not trusted, or
/// there is nothing left to redirect to).
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<h1>Authorization failed</h1><p>{}</p><p class=\"muted\">Return to the application and start again.</p>",
        escape(message)
    );
    page(status, "Authorization failed — demo provider", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(escape("plain-text_1"), "plain-text_1");
    }
}
