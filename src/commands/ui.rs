//! `foreman ui`: the web dashboard's command line. It checks the flags (where to listen, how
//! requests are authenticated, read-only or not) and hands over to `ui::serve`; without the `ui`
//! cargo feature it says so and exits 2.

use std::net::SocketAddr;

use clap::Args;

use super::Globals;
use crate::error::{Error, Result};

const EXIT_CODES: &str = "\
Exit codes:
  0  never: it serves until it is stopped (SIGINT or SIGTERM)
  1  the database cannot be opened, or the address cannot be listened on
  2  usage or configuration error, e.g. a non-loopback --bind without --token or
     --proxy-user-header, or a foreman built without the `ui` feature

The first line on stdout is the dashboard's URL (with --bind 127.0.0.1:0, the port picked).
Examples:
  foreman ui
  foreman ui --read-only --bind 0.0.0.0:8075 --token \"$(cat /etc/foreman/ui-token)\"
  foreman ui --bind 10.0.0.5:8075 --proxy-user-header X-Forwarded-User --allow-host queue.example.com";

/// Serve the web dashboard: health, queue, charts, tasks, dead letters, errors, schedules, daemons
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct UiArgs {
    /// Address and port to listen on; port 0 picks a free one
    #[arg(
        long,
        env = "FOREMAN_UI_BIND",
        default_value = "127.0.0.1:8075",
        value_name = "ADDR:PORT"
    )]
    pub bind: SocketAddr,
    /// Secret every request must carry (Authorization: Bearer, or ?token= once in the browser,
    /// which sets a cookie); required to listen on a non-loopback address without a proxy
    #[arg(
        long,
        env = "FOREMAN_UI_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Header in which a trusted reverse proxy names the signed-in user; requests without it are
    /// refused, and actions are logged and recorded under that name
    #[arg(long, env = "FOREMAN_UI_PROXY_USER_HEADER", value_name = "NAME")]
    pub proxy_user_header: Option<String>,
    /// Another host name the dashboard may be reached by (a proxy's public name); IP addresses
    /// and localhost are always allowed. Repeatable
    #[arg(long, value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Open the database read-only and refuse every action (403)
    #[arg(long, env = "FOREMAN_UI_READ_ONLY")]
    pub read_only: bool,
}

pub fn run(globals: &Globals, args: &UiArgs) -> Result<()> {
    let token = args.token.clone().filter(|t| !t.is_empty());
    let proxy_user_header = args.proxy_user_header.clone().filter(|h| !h.is_empty());
    if !args.bind.ip().is_loopback() && token.is_none() && proxy_user_header.is_none() {
        return Err(Error::Config(format!(
            "--bind {}: a non-loopback address needs --token (or FOREMAN_UI_TOKEN) or --proxy-user-header, \
             or anyone who reaches it could cancel, requeue and purge tasks",
            args.bind
        )));
    }
    // It travels in a cookie and a header: printable ASCII without separators.
    if let Some(token) = &token
        && !token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
    {
        return Err(Error::Config(
            "--token: use printable ASCII without spaces, quotes, commas, semicolons or backslashes (e.g. openssl rand -hex 32)".to_owned(),
        ));
    }
    if let Some(header) = &proxy_user_header
        && !header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::Config(format!(
            "--proxy-user-header {header:?}: not a header name"
        )));
    }
    let config = globals.load_config()?;
    serve(config, args, token, proxy_user_header)
}

#[cfg(feature = "ui")]
fn serve(
    config: crate::config::Config,
    args: &UiArgs,
    token: Option<String>,
    proxy_user_header: Option<String>,
) -> Result<()> {
    crate::ui::serve(
        config,
        crate::ui::Options {
            bind: args.bind,
            token,
            proxy_user_header,
            allow_hosts: args.allow_host.clone(),
            read_only: args.read_only,
        },
    )
}

#[cfg(not(feature = "ui"))]
fn serve(
    _config: crate::config::Config,
    _args: &UiArgs,
    _token: Option<String>,
    _proxy_user_header: Option<String>,
) -> Result<()> {
    Err(Error::Config(
        "this foreman was built without the `ui` cargo feature (it is on by default); rebuild it with `--features ui`".to_owned(),
    ))
}
