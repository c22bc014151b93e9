//! `foreman ui`, the web dashboard: a synchronous HTTP server (tiny_http) with a fixed handful of
//! threads, each with its own read connection, serving the embedded page (`assets`), a JSON twin
//! of every page (`api`), the actions (`actions`) and a stream of changes (`live`). It keeps no
//! task state: every answer is read from the database in one short read transaction, through the
//! same code as the CLI's. It is its own process: the daemon neither links to it at run time nor
//! knows it exists.
//!
//! **Invariant:** everything that reaches the page from the database is data in a JSON document,
//! which the page renders as text; no HTML is ever built from it here.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{Access, Store};

mod actions;
mod api;
mod assets;
mod http;
mod live;

use http::{Reply, Request};

/// Threads answering requests. A dashboard has a handful of operators; the event streams have
/// threads of their own (`live::MAX_STREAMS`), so a slow client holds up nobody.
const WORKERS: usize = 4;

/// What `foreman ui`'s flags asked for, checked (`commands/ui.rs`).
#[derive(Debug, Clone)]
pub struct Options {
    pub bind: SocketAddr,
    /// Every request must carry it.
    pub token: Option<String>,
    /// The header a trusted proxy names the user in; every request must carry it.
    pub proxy_user_header: Option<String>,
    /// Host names answered besides IP addresses and localhost.
    pub allow_hosts: Vec<String>,
    pub read_only: bool,
}

/// What every request handler shares.
pub struct Shared {
    pub config: Config,
    pub options: Options,
    /// Where the server listens (the port picked, for port 0).
    pub addr: SocketAddr,
    pub hub: Arc<live::Hub>,
}

impl Shared {
    fn access(&self) -> Access {
        if self.options.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        }
    }

    /// A connection of this process's own, opened as the flags say.
    pub fn open(&self) -> Result<Store> {
        Store::open_checked(&self.config.db, self.access())
    }
}

/// Serves the dashboard until the process is stopped. The database is opened once first, so a
/// missing file or an unknown schema stops it before it listens.
pub fn serve(config: Config, options: Options) -> Result<()> {
    let shared = Shared {
        hub: Arc::new(live::Hub::new()),
        addr: options.bind,
        config,
        options,
    };
    drop(shared.open()?);
    let server = tiny_http::Server::http(shared.options.bind).map_err(|e| {
        Error::Environment(format!("cannot listen on {}: {e}", shared.options.bind))
    })?;
    let addr = server.server_addr().to_ip().unwrap_or(shared.options.bind);
    let url = format!("http://{}/", http::host_of(addr));
    // The first line on stdout is the URL: a script (or a test) that asked for port 0 reads it.
    crate::commands::print_line(&url)?;
    log::info!(
        "dashboard for {} at {url}{}{}",
        shared.config.db,
        if shared.options.read_only {
            " (read-only)"
        } else {
            ""
        },
        if shared.options.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    let shared = Arc::new(Shared { addr, ..shared });
    let server = Arc::new(server);
    let hub = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("ui-live".to_owned())
            .spawn(move || live::watch(&shared))
            .map_err(|e| Error::io("starting the dashboard's watcher", e))?
    };
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let (shared, server) = (Arc::clone(&shared), Arc::clone(&server));
        workers.push(
            std::thread::Builder::new()
                .name(format!("ui-{i}"))
                .spawn(move || work(&shared, &server))
                .map_err(|e| Error::io("starting the dashboard's threads", e))?,
        );
    }
    for worker in workers {
        let _ = worker.join();
    }
    let _ = hub.join();
    Ok(())
}

/// One worker: answers requests one at a time with its own connection, opened at its first
/// request and again after an error (the file may have been replaced).
fn work(shared: &Shared, server: &tiny_http::Server) {
    let mut store: Option<Store> = None;
    loop {
        let raw = match server.recv() {
            Ok(raw) => raw,
            Err(e) => {
                log::warn!("dashboard: {e}");
                continue;
            }
        };
        let mut request = Request::new(raw, shared);
        let reply = match request.check() {
            Err(refusal) => refusal,
            Ok(()) => route(shared, &mut store, &mut request),
        };
        request.send(reply);
    }
}

/// The answer to a request that passed the checks.
fn route(shared: &Shared, store: &mut Option<Store>, request: &mut Request) -> Reply {
    let path = request.path().to_owned();
    if request.is_post() {
        return with_store(shared, store, |store| {
            actions::handle(shared, store, request, &path)
        });
    }
    if let Some(name) = path.strip_prefix("/assets/") {
        return assets::reply(name, request.header("if-none-match"));
    }
    if path == "/api/events" {
        return live::subscribe(shared, request);
    }
    if let Some(page) = path.strip_prefix("/api/") {
        let page = page.to_owned();
        return with_store(shared, store, |store| {
            api::get(shared, store, request, &page)
        });
    }
    if assets::is_page(&path) {
        return assets::page();
    }
    Reply::error(404, &format!("no page {path}"))
}

/// Runs `answer` with this thread's connection, opening it if needed; an error that may come
/// from the connection itself drops it, so the next request opens a fresh one.
fn with_store(
    shared: &Shared,
    store: &mut Option<Store>,
    answer: impl FnOnce(&mut Store) -> Result<Reply>,
) -> Reply {
    if store.is_none() {
        match shared.open() {
            Ok(opened) => *store = Some(opened),
            Err(e) => return Reply::error(503, &e.to_string()),
        }
    }
    let Some(open) = store.as_mut() else {
        return Reply::error(503, "no database connection");
    };
    match answer(open) {
        Ok(reply) => reply,
        Err(e) => {
            let status = match e {
                Error::Config(_) => 400,
                Error::Db { .. } | Error::Environment(_) | Error::Io { .. } => {
                    *store = None;
                    503
                }
                _ => 500,
            };
            Reply::error(status, &e.to_string())
        }
    }
}
