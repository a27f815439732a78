//! Which TCP ports a running step listens on, read from /proc.
//!
//! In pod mode every step shares one network namespace, so a service that fails with
//! "address already in use" collided with another step. The executor asks this module
//! which ports the other services hold at that moment, to name the step that took the
//! port. A step's processes are its first process, that process's descendants and
//! its process group (a daemon that forked away keeps the group); sockets come from
//! their descriptors, matched against the LISTEN entries of /proc/PID/net/tcp{,6}
//! (which show the namespace of PID). Best effort: anything unreadable is skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;

/// TCP state number of LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Socket inode -> local port of every listening socket in one /proc/net/tcp{,6} text.
pub(crate) fn parse_proc_net_tcp(text: &str) -> HashMap<u64, u16> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != TCP_LISTEN {
            continue;
        }
        let port = f[1]
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if let (Some(port), Ok(inode)) = (port, f[9].parse::<u64>()) {
            out.insert(inode, port);
        }
    }
    out
}

/// (parent pid, process group) from the text of /proc/PID/stat.
fn parse_stat(text: &str) -> Option<(i32, i32)> {
    // The command name is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let _state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// The ports each step listens on. `steps` pairs a step key with the pid of the
/// process the step started (which is also its process group).
pub fn listening_ports(steps: &[(String, i32)]) -> BTreeMap<String, BTreeSet<u16>> {
    let mut out = BTreeMap::new();
    let Some(&(_, any_pid)) = steps.first() else {
        return out;
    };
    let mut listening = HashMap::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{any_pid}/net/{table}")) {
            listening.extend(parse_proc_net_tcp(&text));
        }
    }
    if listening.is_empty() {
        return out;
    }
    let mut parents = HashMap::new();
    let mut groups = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((ppid, pgrp)) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            parents.insert(pid, ppid);
            groups.insert(pid, pgrp);
        }
    }
    let owner = |pid: i32| -> Option<&String> {
        let by_group = steps.iter().find(|(_, p)| groups.get(&pid) == Some(p));
        if let Some((key, _)) = by_group {
            return Some(key);
        }
        let mut cur = pid;
        for _ in 0..64 {
            if let Some((key, _)) = steps.iter().find(|(_, p)| *p == cur) {
                return Some(key);
            }
            cur = *parents.get(&cur)?;
            if cur <= 1 {
                return None;
            }
        }
        None
    };
    for &pid in parents.keys() {
        let Some(key) = owner(pid) else { continue };
        for fd in fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(port) = inode.and_then(|i| listening.get(&i)) {
                out.entry(key.clone())
                    .or_insert_with(BTreeSet::new)
                    .insert(*port);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:9C40 0100007F:2328 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        let m = parse_proc_net_tcp(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&4242], 9000);
    }

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        assert_eq!(
            parse_stat("123 (my (odd) name) S 45 67 67 0 -1"),
            Some((45, 67))
        );
    }

    #[test]
    fn finds_a_listener_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id() as i32;
        let found = listening_ports(&[("me".to_string(), me)]);
        assert!(
            found.get("me").is_some_and(|p| p.contains(&port)),
            "{found:?} should hold {port}"
        );
    }
}
