//! The page's files, embedded in the binary (no CDN, no build step): one HTML shell for every
//! page, one script, one style sheet, and uPlot (MIT, vendored from the npm registry, version
//! 1.6.32) for the charts. Each is served with an ETag of its content, so a browser revalidates
//! instead of downloading it again.

use super::http::Reply;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 5] = [
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("assets/uPlot.LICENSE"),
    },
];

const SHELL: &[u8] = include_bytes!("assets/index.html");

/// The paths the shell is served at; its script renders the page from the path.
const PAGES: [&str; 6] = ["/", "/tasks", "/dead", "/errors", "/schedules", "/daemons"];

pub fn is_page(path: &str) -> bool {
    PAGES.contains(&path)
        || path
            .strip_prefix("/tasks/")
            .is_some_and(|id| id.parse::<i64>().is_ok())
}

pub fn page() -> Reply {
    Reply::bytes("text/html; charset=utf-8", SHELL.to_vec())
        .with_header("Cache-Control", "no-cache".to_owned())
}

/// An asset, or 304 when the browser's copy (`if_none_match`) is current.
pub fn reply(name: &str, if_none_match: Option<String>) -> Reply {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Reply::error(404, &format!("no asset {name}"));
    };
    let etag = format!("\"{:016x}\"", fnv1a(asset.body));
    if if_none_match.is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag)) {
        return Reply::bytes(asset.content_type, Vec::new())
            .with_status(304)
            .with_header("ETag", etag);
    }
    Reply::bytes(asset.content_type, asset.body.to_vec())
        .with_header("ETag", etag)
        .with_header("Cache-Control", "no-cache".to_owned())
}

/// FNV-1a: a content hash for ETags, not for security.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
