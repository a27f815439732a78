//! The text of each step's `/etc/hosts` and `/etc/resolv.conf`.
//!
//! Steps find each other through `/etc/hosts` only: there is no DNS server on the
//! stage network, so a lookup never waits for one. The resolv.conf we write makes any
//! DNS query fail at once (nothing answers on the step's own loopback) instead of
//! stalling on the host's nameserver, which the step cannot reach.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::plan::{NetworkMode, NetworkPlan};

/// musl reads /etc/hosts lines into a 512-byte buffer and old glibc allowed 35 aliases:
/// long name lists are split over several lines for the same address.
const MAX_LINE: usize = 400;
const MAX_NAMES_PER_LINE: usize = 16;

/// `/etc/hosts` for the step `key` (`None` when the plan has no such step).
pub fn render_hosts(plan: &NetworkPlan, key: &str) -> Option<String> {
    let me = plan.step(key)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# /etc/hosts of step `{key}`, written by sandrun ({} network {})",
        plan.mode, plan.subnet
    );
    out.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match plan.mode {
        NetworkMode::Bridge => {
            for step in &plan.steps {
                push_entries(&mut out, step.address, step.hostnames.iter());
            }
        }
        NetworkMode::Pod => {
            let mut names: Vec<&String> = Vec::new();
            for step in &plan.steps {
                for name in &step.hostnames {
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            push_entries(&mut out, me.address, names.into_iter());
        }
    }
    Some(out)
}

fn push_entries<'a>(out: &mut String, address: Ipv4Addr, names: impl Iterator<Item = &'a String>) {
    let prefix = format!("{address}\t");
    let mut line = String::new();
    let mut count = 0;
    for name in names {
        if count > 0
            && (count == MAX_NAMES_PER_LINE
                || prefix.len() + line.len() + 1 + name.len() > MAX_LINE)
        {
            let _ = writeln!(out, "{prefix}{line}");
            line.clear();
            count = 0;
        }
        if count > 0 {
            line.push(' ');
        }
        line.push_str(name);
        count += 1;
    }
    if count > 0 {
        let _ = writeln!(out, "{prefix}{line}");
    }
}

/// `/etc/resolv.conf` for a step. `nameserver` is the egress DNS forwarder when egress
/// is on; without it no nameserver line is written, so resolvers fall back to the
/// step's own loopback, where nothing listens and a query is refused immediately.
pub fn render_resolv_conf(nameserver: Option<Ipv4Addr>) -> String {
    match nameserver {
        Some(ns) => format!(
            "# written by sandrun: egress is on; step names resolve through /etc/hosts\n\
             nameserver {ns}\noptions timeout:2 attempts:2\n"
        ),
        None => "# written by sandrun: the stage network has no egress and no DNS server;\n\
                 # step names resolve through /etc/hosts\n\
                 options timeout:1 attempts:1\n"
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::plan::{allocate, step_hostnames, StepRequest};

    fn req(key: &str, names: Vec<String>) -> StepRequest {
        StepRequest {
            key: key.into(),
            hostnames: names,
            port_bindings: vec![],
            on_machine: false,
        }
    }

    #[test]
    fn bridge_hosts_lists_every_step_by_address() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[
                req("db", step_hostnames("db", None)),
                req("sg/Cache", step_hostnames("Cache", Some("sg"))),
            ],
        )
        .unwrap();
        let hosts = render_hosts(&plan, "db").unwrap();
        assert_eq!(
            hosts,
            "# /etc/hosts of step `db`, written by sandrun (bridge network 10.213.0.0/16)\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             10.213.0.2\tdb\n\
             10.213.0.3\tCache cache sg_Cache sg_cache\n"
        );
        assert!(render_hosts(&plan, "nope").is_none());
    }

    #[test]
    fn pod_hosts_maps_every_name_to_the_shared_address() {
        let plan = allocate(
            NetworkMode::Pod,
            &[
                req("db", step_hostnames("db", None)),
                req("app", step_hostnames("app", None)),
            ],
        )
        .unwrap();
        let hosts = render_hosts(&plan, "app").unwrap();
        assert!(hosts.ends_with("10.213.0.2\tdb app\n"), "{hosts}");
    }

    #[test]
    fn long_name_lists_are_split_into_short_lines() {
        let steps: Vec<StepRequest> = (0..40)
            .map(|i| req(&format!("s{i}"), vec![format!("service_number_{i:02}")]))
            .collect();
        let plan = allocate(NetworkMode::Pod, &steps).unwrap();
        let hosts = render_hosts(&plan, "s0").unwrap();
        let lines: Vec<&str> = hosts
            .lines()
            .filter(|l| l.starts_with("10.213.0.2\t"))
            .collect();
        assert!(lines.len() >= 3, "{hosts}");
        assert!(lines
            .iter()
            .all(|l| l.len() <= MAX_LINE && l.split(' ').count() <= MAX_NAMES_PER_LINE));
        let names: usize = lines.iter().map(|l| l.split(['\t', ' ']).count() - 1).sum();
        assert_eq!(names, 40);
    }

    #[test]
    fn resolv_conf_without_egress_names_no_server() {
        let text = render_resolv_conf(None);
        assert!(!text.contains("nameserver"));
        assert!(text.contains("timeout:1"));
        assert!(
            render_resolv_conf(Some(Ipv4Addr::new(10, 0, 2, 3))).contains("nameserver 10.0.2.3\n")
        );
    }
}
