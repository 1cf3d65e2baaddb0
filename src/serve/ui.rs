//! The dashboard's files, embedded in the binary: plain HTML, CSS and
//! JavaScript modules (no build step, no third-party code). `/` is the page;
//! everything it loads is under `/ui/`. The files hold no data and need no
//! key: the page asks for the API key and sends it with each API call.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// (name, content type, content).
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("ui/index.html")),
    ("style.css", "text/css; charset=utf-8", include_str!("ui/style.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("ui/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("ui/api.js")),
    ("fleet.js", "text/javascript; charset=utf-8", include_str!("ui/fleet.js")),
    ("instance.js", "text/javascript; charset=utf-8", include_str!("ui/instance.js")),
    ("diagram.js", "text/javascript; charset=utf-8", include_str!("ui/diagram.js")),
    ("words.js", "text/javascript; charset=utf-8", include_str!("ui/words.js")),
];

/// Only this origin's files and API; no inline script or style.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` and `/ui/{file}`, for any router state.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("index.html") }))
        .route("/ui/", get(|| async { file("index.html") }))
        .route("/ui/{file}", get(|Path(name): Path<String>| async move { file(&name) }))
}

fn file(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module the page imports is one the service serves.
    #[test]
    fn every_import_is_served() {
        for (name, _, body) in FILES {
            for line in body.lines().filter(|l| l.trim_start().starts_with("import ")) {
                let Some(start) = line.find("'./") else { continue };
                let rest = &line[start + 3..];
                let imported = &rest[..rest.find('\'').unwrap_or(rest.len())];
                assert!(FILES.iter().any(|(n, _, _)| *n == imported), "{name} imports {imported}, not served");
            }
        }
        let index = FILES[0].2;
        for (name, _, _) in &FILES[1..] {
            if name.ends_with(".css") || *name == "app.js" {
                assert!(index.contains(&format!("/ui/{name}")), "index.html loads {name}");
            }
        }
    }
}
