//! Running foreman with in-process Rust handlers from your own `main`.
//!
//! `cargo run --example inproc`, then in another shell:
//! `cargo run -- enqueue app.greet '["world"]'`

use foreman::{Config, Overrides, Registry};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let registry = Registry::new().register("app.greet", |task| {
        let who = task
            .args
            .first()
            .and_then(|v| v.as_str())
            .ok_or("app.greet expects args [name]")?;
        log::info!("hello, {who} (task {})", task.id);
        Ok(())
    });
    let result = Config::load(None, &Overrides::default())
        .and_then(|config| Ok((config, foreman::forward_shutdown_signals()?)))
        .and_then(|(config, shutdown)| foreman::run(&config, registry, &shutdown));
    if let Err(e) = result {
        log::error!("{e}");
        std::process::exit(e.exit_code());
    }
}
