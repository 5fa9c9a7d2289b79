//! Applying the configuration file again while the gateway runs: read and check it, refuse
//! it whole when it is invalid or changes a key that cannot change live, else apply the
//! difference part by part (broker access and listeners, uplinks, devices) and report one
//! line per change. Nothing that did not change is touched.

use crate::reload::ReloadReport;

use super::config::{self, Config};
use super::Running;

/// A file the gateway could reload from: the embedded demo has none.
const EMBEDDED: &str = "<embedded demo>";

/// Read the running gateway's configuration file and apply what changed.
pub(super) async fn reload(running: &mut Running) -> ReloadReport {
    let path = running.config.source.clone();
    tracing::info!(config = %path.display(), "reloading the configuration");
    if path.as_os_str() == EMBEDDED {
        return refused(vec![
            "the gateway runs the embedded demo configuration: there is no file to reload \
             (start it with `fieldmq run -c FILE`)"
                .to_owned(),
        ]);
    }
    let wanted = match config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            return refused(error.diagnostics.iter().map(|d| d.to_string()).collect());
        }
    };
    // What an uplink reads when it starts (certificates, keys, password sources) must be
    // readable before anything stops.
    let problems: Vec<String> = wanted
        .uplinks
        .iter()
        .flat_map(|uplink| {
            let file = path.display();
            crate::uplink::check(uplink)
                .into_iter()
                .map(move |e| format!("{file}: uplinks[{}]: {e}", uplink.name))
        })
        .collect();
    if !problems.is_empty() {
        return refused(problems);
    }
    let fixed = fixed_keys_changed(&running.config, &wanted);
    if !fixed.is_empty() {
        return refused(fixed);
    }
    let prepared = match running.broker.prepare_reload(&wanted.broker).await {
        Ok(prepared) => prepared,
        Err(error) => return refused(vec![format!("broker: {error}")]),
    };

    let mut changes = running.broker.apply_reload(prepared).await;
    // Uplinks first: an added uplink's out-routes then see an added device's first readings.
    let uplinks = super::sparkplug_uplinks(&running.handle, &wanted).await;
    changes.extend(running.uplinks.apply(&uplinks).await);
    changes.extend(running.devices.apply(&wanted.devices).await);
    changes.extend(
        running
            .modbus_servers
            .apply(&wanted.modbus_servers, &wanted.devices)
            .await,
    );
    if wanted.homeassistant.is_some() || running.config.homeassistant.is_some() {
        changes.extend(
            super::announce(
                running.handle.clone(),
                wanted.homeassistant.clone(),
                running
                    .config
                    .homeassistant
                    .as_ref()
                    .map(|c| c.discovery_prefix.clone()),
                wanted.gateway.id.clone(),
                wanted.gateway.status_topic.clone(),
                wanted.devices.clone(),
            )
            .await,
        );
    }
    running.stores.replace_outboxes(running.uplinks.outboxes());
    if wanted.gateway.shutdown_timeout != running.config.gateway.shutdown_timeout {
        changes.push(format!(
            "gateway.shutdown_timeout: {}",
            humantime::format_duration(wanted.gateway.shutdown_timeout)
        ));
    }
    running.config = wanted;
    if changes.is_empty() {
        tracing::info!("configuration reloaded: nothing changed");
    }
    for change in &changes {
        tracing::info!("configuration reloaded: {change}");
    }
    ReloadReport::applied(changes)
}

fn refused(errors: Vec<String>) -> ReloadReport {
    for error in &errors {
        tracing::error!("reload refused, nothing changed: {error}");
    }
    ReloadReport::refused(errors)
}

/// The keys whose change needs a restart, each with the reason it is refused. Everything
/// else applies live: devices, uplinks, listeners, `allow_anonymous`, the password and ACL
/// files, `shutdown_timeout`.
pub(crate) fn fixed_keys_changed(running: &Config, wanted: &Config) -> Vec<String> {
    let (g, w) = (&running.gateway, &wanted.gateway);
    let (b, v) = (&running.broker, &wanted.broker);
    let fixed = [
        // The stores' files and their locks.
        ("gateway.data_dir", g.data_dir != w.data_dir),
        // Every device topic, status topic and cloud client id is made from it.
        ("gateway.id", g.id != w.id),
        ("gateway.status_topic", g.status_topic != w.status_topic),
        // Set up once with the logging and the async runtime.
        ("gateway.log_level", g.log_level != w.log_level),
        (
            "gateway.worker_threads",
            g.worker_threads != w.worker_threads,
        ),
        // The broker store: its file, durability and commit settings.
        ("broker.durability", b.durability != v.durability),
        ("broker.store_path", b.store_path != v.store_path),
        ("broker.commit_window", b.commit_window != v.commit_window),
        // The router's and the sessions' limits, fixed when they were created.
        (
            "broker.max_queued_messages",
            b.max_queued_messages != v.max_queued_messages,
        ),
        (
            "broker.max_queued_bytes",
            b.max_queued_bytes != v.max_queued_bytes,
        ),
        ("broker.queue_memory", b.queue_memory != v.queue_memory),
        (
            "broker.max_packet_size",
            b.max_packet_size != v.max_packet_size,
        ),
        ("broker.max_inflight", b.max_inflight != v.max_inflight),
        (
            "broker.max_keep_alive",
            b.max_keep_alive != v.max_keep_alive,
        ),
        (
            "broker.slow_client_timeout",
            b.slow_client_timeout != v.slow_client_timeout,
        ),
        (
            "broker.subscribe_denied_reason",
            b.subscribe_denied_reason != v.subscribe_denied_reason,
        ),
        ("broker.sys_interval", b.sys_interval != v.sys_interval),
    ];
    fixed
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| format!("{key} cannot change while the gateway runs; restart to apply it"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        config::parse(text, std::path::Path::new("/etc/fieldmq/test.toml")).expect("valid")
    }

    const BASE: &str = "[gateway]\nid = \"g\"\ndata_dir = \"/var/lib/a\"\n";
    const ANONYMOUS: &str = "[broker]\nallow_anonymous = true\n";

    #[test]
    fn a_changed_data_dir_is_named_and_devices_are_not() {
        let running = parse(&format!("{BASE}{ANONYMOUS}"));
        let wanted = parse(&format!(
            "{}{ANONYMOUS}[[devices]]\nname = \"d\"\ndriver = \"simulated\"\n\
             points = [{{ name = \"p\", waveform = \"constant\", value = 1.0 }}]\n",
            BASE.replace("/var/lib/a", "/var/lib/b")
        ));
        let refused = fixed_keys_changed(&running, &wanted);
        assert_eq!(
            refused.first().map(String::as_str),
            Some("gateway.data_dir cannot change while the gateway runs; restart to apply it")
        );
        assert!(!refused.iter().any(|r| r.contains("device")), "{refused:?}");
    }

    #[test]
    fn listeners_access_and_the_shutdown_timeout_may_change() {
        let running = parse(&format!("{BASE}{ANONYMOUS}"));
        let wanted = parse(&format!(
            "{BASE}shutdown_timeout = \"3s\"\n{ANONYMOUS}\
             [[broker.listeners]]\nbind = \"127.0.0.1:1884\"\n"
        ));
        assert_eq!(fixed_keys_changed(&running, &wanted), Vec::<String>::new());
    }

    #[test]
    fn a_changed_store_setting_is_named() {
        let running = parse(&format!("{BASE}{ANONYMOUS}"));
        let wanted = parse(&format!("{BASE}{ANONYMOUS}durability = \"memory\"\n"));
        assert_eq!(
            fixed_keys_changed(&running, &wanted),
            vec![
                "broker.durability cannot change while the gateway runs; restart to apply it"
                    .to_owned()
            ]
        );
    }
}
