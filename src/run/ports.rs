//! Port collisions between services of a pod-mode stage.
//!
//! In pod mode (KubernetesDirect) every step shares one network namespace, exactly as
//! containers of a Kubernetes Pod do, so two services on one port collide there. Two
//! `portBindings` on one container port are refused at plan time; this module covers
//! what is only known at run time: the ports the services' images expose (a warning
//! before the stage starts) and a service that died with "address already in use"
//! (a note naming the step that holds the port, from declarations and from the
//! listening sockets of the running services).

use std::collections::{BTreeMap, BTreeSet};

use crate::net::NetworkMode;
use crate::plan::{StagePlan, StepPlan, StepType};
use crate::run::images::Images;

/// What an "address already in use" failure looks like in the output of common
/// servers (Python, Go, Node, nginx, Postgres, Java, busybox).
const ADDR_IN_USE: &[&str] = &[
    "address already in use",
    "eaddrinuse",
    "bind: address in use",
];

/// The TCP ports of an image's `ExposedPorts` (`"8080/tcp"` or a bare `"8080"`).
pub fn tcp_ports<'a>(exposed: impl IntoIterator<Item = &'a String>) -> Vec<u16> {
    let mut ports: Vec<u16> = exposed
        .into_iter()
        .filter_map(|p| match p.split_once('/') {
            Some((n, proto)) if proto.eq_ignore_ascii_case("tcp") => n.parse().ok(),
            None => p.parse().ok(),
            _ => None,
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The TCP ports a step's image declares in `ExposedPorts`.
pub fn exposed_ports(step: &StepPlan, images: &Images) -> Vec<u16> {
    step.image
        .as_ref()
        .and_then(|i| images.get(&i.source))
        .and_then(|i| i.config.config().as_ref())
        .and_then(|c| c.exposed_ports().as_ref())
        .map(tcp_ports)
        .unwrap_or_default()
}

/// Where a step's claim on a port comes from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    PortBinding,
    ExposedPort,
    Listening,
}

impl Claim {
    fn describe(self) -> &'static str {
        match self {
            Claim::PortBinding => "its portBindings",
            Claim::ExposedPort => "its image's ExposedPorts",
            Claim::Listening => "listening now",
        }
    }
}

/// The ports each Background step of a pod-mode stage declares.
#[derive(Clone, Debug, Default)]
pub struct PodPorts {
    /// step key -> port -> how it was declared.
    declared: BTreeMap<String, BTreeMap<u16, Claim>>,
}

impl PodPorts {
    /// `None` unless the stage runs in pod mode.
    pub fn for_stage(stage: &StagePlan, images: &Images) -> Option<PodPorts> {
        if stage.network.mode != NetworkMode::Pod {
            return None;
        }
        let mut pods = PodPorts::default();
        for step in stage.steps() {
            if step.step_type != StepType::Background || step.unsupported.is_some() {
                continue;
            }
            for port in exposed_ports(step, images) {
                pods.declare(&step.key, port, Claim::ExposedPort);
            }
            for &(_, port) in &step.port_bindings {
                pods.declare(&step.key, port, Claim::PortBinding);
            }
        }
        Some(pods)
    }

    pub fn declare(&mut self, step: &str, port: u16, claim: Claim) {
        self.declared
            .entry(step.to_string())
            .or_default()
            .insert(port, claim);
    }

    /// One warning per port that two or more services declare.
    pub fn collisions(&self) -> Vec<String> {
        let mut by_port: BTreeMap<u16, Vec<(&str, Claim)>> = BTreeMap::new();
        for (step, ports) in &self.declared {
            for (&port, &claim) in ports {
                by_port.entry(port).or_default().push((step, claim));
            }
        }
        by_port
            .into_iter()
            .filter(|(_, steps)| steps.len() > 1)
            .map(|(port, steps)| {
                let names: Vec<String> = steps
                    .iter()
                    .map(|(s, c)| format!("`{s}` ({})", c.describe()))
                    .collect();
                format!(
                    "port {port} is claimed by {}: in pod mode all steps share one network \
                     (as containers of a Kubernetes Pod do), so only one of them can listen on it",
                    join_and(&names)
                )
            })
            .collect()
    }

    /// When `dead`'s last output lines say "address already in use", a note naming the
    /// other services that hold the port. `listening` is what the running services
    /// listen on now (step key -> ports).
    pub fn bind_conflict(
        &self,
        dead: &str,
        last_lines: &[String],
        listening: &BTreeMap<String, BTreeSet<u16>>,
    ) -> Option<String> {
        let failed_line = last_lines.iter().rev().find(|l| mentions_addr_in_use(l))?;
        // The ports the dead step wanted: numbers near the error, else its declarations.
        let mut wanted: BTreeSet<u16> = numbers(failed_line).into_iter().collect();
        if let Some(own) = self.declared.get(dead) {
            wanted.extend(own.keys());
        }
        let mut holders: BTreeMap<u16, BTreeMap<&str, Claim>> = BTreeMap::new();
        let others_declared = self
            .declared
            .iter()
            .flat_map(|(s, p)| p.iter().map(move |(port, c)| (s.as_str(), *port, *c)));
        let others_listening = listening.iter().flat_map(|(s, p)| {
            p.iter()
                .map(move |port| (s.as_str(), *port, Claim::Listening))
        });
        for (step, port, claim) in others_declared.chain(others_listening) {
            if step != dead {
                let c = holders
                    .entry(port)
                    .or_default()
                    .entry(step)
                    .or_insert(claim);
                *c = (*c).min(claim);
            }
        }
        let matching: Vec<u16> = holders
            .keys()
            .copied()
            .filter(|p| wanted.contains(p))
            .collect();
        // Without a port to go by, every port another service holds is a suspect.
        let suspects: Vec<u16> = if !matching.is_empty() {
            matching
        } else if wanted.is_empty() {
            holders.keys().copied().collect()
        } else {
            Vec::new()
        };
        let why = "in pod mode all steps share one network, as containers of a Kubernetes Pod do";
        if suspects.is_empty() {
            return Some(format!(
                "`{dead}` could not bind its port (\"{}\"); no other service of the stage is \
                 known to hold it, but {why}",
                failed_line.trim()
            ));
        }
        let parts: Vec<String> = suspects
            .iter()
            .map(|port| {
                let steps: Vec<String> = holders[port]
                    .iter()
                    .map(|(s, c)| format!("`{s}` ({})", c.describe()))
                    .collect();
                format!("port {port} is taken by {}", join_and(&steps))
            })
            .collect();
        Some(format!(
            "`{dead}` could not bind its port: {}; {why}",
            parts.join(", ")
        ))
    }
}

fn mentions_addr_in_use(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    ADDR_IN_USE.iter().any(|m| l.contains(m))
}

/// Numbers in a line that can be ports (a port follows ':' or stands alone; errno
/// values such as "[Errno 98]" and "(98:" are small enough to be both, so they are
/// skipped when they follow "errno" or precede ':').
fn numbers(line: &str) -> Vec<u16> {
    let lower = line.to_ascii_lowercase();
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let before = lower[..start].trim_end();
        let errno = before.ends_with("errno") || before.ends_with('(');
        let after_alnum = start > 0 && bytes[start - 1].is_ascii_alphanumeric();
        let dotted = (start > 0 && bytes[start - 1] == b'.') || bytes.get(i) == Some(&b'.');
        if !errno && !after_alnum && !dotted {
            if let Ok(n) = line[start..i].parse::<u16>() {
                if n > 0 {
                    out.push(n);
                }
            }
        }
    }
    out
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(decl: &[(&str, u16, Claim)]) -> PodPorts {
        let mut p = PodPorts::default();
        for &(s, port, c) in decl {
            p.declare(s, port, c);
        }
        p
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn exposed_ports_keep_tcp_only() {
        let e: Vec<String> = ["5432/tcp", "53/udp", "8080", "x/tcp"]
            .map(String::from)
            .to_vec();
        assert_eq!(tcp_ports(&e), vec![5432, 8080]);
    }

    #[test]
    fn two_images_exposing_one_port_name_both_steps() {
        let p = pods(&[
            ("db1", 5432, Claim::ExposedPort),
            ("db2", 5432, Claim::ExposedPort),
            ("cache", 6379, Claim::ExposedPort),
        ]);
        let w = p.collisions();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("port 5432 is claimed by `db1` (its image's ExposedPorts) and `db2`"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn a_binding_and_an_exposed_port_collide_too() {
        let p = pods(&[
            ("web", 80, Claim::PortBinding),
            ("proxy", 80, Claim::ExposedPort),
        ]);
        assert_eq!(p.collisions().len(), 1);
        assert!(pods(&[("a", 1, Claim::ExposedPort)])
            .collisions()
            .is_empty());
    }

    #[test]
    fn other_failures_get_no_note() {
        let p = pods(&[("a", 9000, Claim::ExposedPort)]);
        assert_eq!(
            p.bind_conflict("b", &lines("Permission denied"), &BTreeMap::new()),
            None
        );
    }

    #[test]
    fn python_names_the_listening_step_without_a_port_in_the_message() {
        let mut listening = BTreeMap::new();
        listening.insert("a".to_string(), BTreeSet::from([9000]));
        let note = PodPorts::default()
            .bind_conflict(
                "b",
                &lines("Traceback ...\nOSError: [Errno 98] Address already in use"),
                &listening,
            )
            .unwrap();
        assert!(
            note.contains("`b` could not bind its port: port 9000 is taken by `a` (listening now)"),
            "{note}"
        );
    }

    #[test]
    fn the_port_in_the_message_picks_the_holder() {
        let p = pods(&[
            ("pg", 5432, Claim::ExposedPort),
            ("web", 8080, Claim::ExposedPort),
        ]);
        let go = lines("listen tcp :8080: bind: address already in use");
        let note = p.bind_conflict("api", &go, &BTreeMap::new()).unwrap();
        assert!(note.contains("port 8080 is taken by `web`"), "{note}");
        assert!(!note.contains("5432"), "{note}");

        let nginx =
            lines("nginx: [emerg] bind() to 0.0.0.0:8080 failed (98: Address already in use)");
        let note = p.bind_conflict("api", &nginx, &BTreeMap::new()).unwrap();
        assert!(
            note.contains("port 8080 is taken by `web`") && !note.contains("98"),
            "{note}"
        );

        let node = lines("Error: listen EADDRINUSE: address already in use :::5432");
        let note = p.bind_conflict("api", &node, &BTreeMap::new()).unwrap();
        assert!(note.contains("port 5432 is taken by `pg`"), "{note}");
    }

    #[test]
    fn a_declared_and_listening_holder_is_named_once_by_its_declaration() {
        let p = pods(&[
            ("db1", 5432, Claim::ExposedPort),
            ("db2", 5432, Claim::ExposedPort),
        ]);
        let mut listening = BTreeMap::new();
        listening.insert("db1".to_string(), BTreeSet::from([5432]));
        let pg = lines("LOG:  could not bind IPv4 address \"0.0.0.0\": Address already in use");
        let note = p.bind_conflict("db2", &pg, &listening).unwrap();
        assert!(
            note.contains("port 5432 is taken by `db1` (its image's ExposedPorts);"),
            "{note}"
        );
    }

    #[test]
    fn an_unknown_holder_is_said_plainly() {
        let note = PodPorts::default()
            .bind_conflict("b", &lines("bind: Address in use"), &BTreeMap::new())
            .unwrap();
        assert!(
            note.contains("no other service of the stage is known to hold it"),
            "{note}"
        );
    }
}
