//! The dashboard: one HTML page and its assets, embedded in the binary and served at `/` and
//! `/assets/…`. Plain HTML, CSS and JavaScript, no framework and nothing fetched from
//! elsewhere, so it works offline and behind a firewall.
//!
//! The page and its assets are public (they hold no data); everything the page shows comes
//! from `/graphql` and `/graphql/ws`, which the bearer token guards. With a token
//! configured, the page asks for it and keeps it in the tab's `sessionStorage`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    /// Its name under `/assets/` (the page itself: `index.html`, served at `/`).
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The page: served at `/` and `/index.html`.
const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("dashboard/index.html"),
};

/// What the page loads, under `/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("dashboard/app.css"),
    },
    Asset {
        name: "queries.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("dashboard/queries.js"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("dashboard/app.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("dashboard/favicon.svg"),
    },
];

/// The page's Content-Security-Policy: its own scripts, styles and connections only (the
/// WebSocket to this server included: older browsers do not count `ws:` as `'self'`), no
/// inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The dashboard's routes: `GET /`, `GET /index.html`, `GET /assets/{name}`.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{name}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|asset| asset.name == name) {
        Some(asset) => serve(asset, &headers),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

/// The asset, or `304 Not Modified` when the browser's copy (`If-None-Match`) is current.
///
/// The URLs carry no version, so browsers revalidate every time (`no-cache`): a cheap 304
/// while the server runs the same build, the new file as soon as it does not.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = etag(asset.body);
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|given| given.split(',').any(|tag| tag.trim() == etag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if asset.name == INDEX.name {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    (headers, asset.body).into_response()
}

/// A strong entity tag for `body`: its 64-bit FNV-1a hash and length.
fn etag(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("\"{hash:016x}-{:x}\"", body.len())
}

#[cfg(test)]
mod tests {
    use super::{ASSETS, INDEX, etag};

    #[test]
    fn entity_tags_differ_with_the_content() {
        assert_eq!(etag(b"abc"), etag(b"abc"));
        assert_ne!(etag(b"abc"), etag(b"abd"));
        let tags: std::collections::HashSet<_> = ASSETS
            .iter()
            .chain([&INDEX])
            .map(|asset| etag(asset.body))
            .collect();
        assert_eq!(tags.len(), ASSETS.len() + 1);
    }
}
