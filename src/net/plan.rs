//! The network part of a stage plan, decided before anything runs: which mode the
//! stage uses, which address each step gets and which names resolve to it.
//!
//! This is pure data so that `sandrun plan` can print it and tests can compare it; the
//! live network (`StageNetwork`) is built from it and never decides anything itself.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::Serialize;

/// A stage whose network cannot be planned; found before anything starts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetPlanError {
    #[error("unknown network mode `{0}` (expected `bridge` or `pod`)")]
    UnknownMode(String),
    #[error("step key `{0}` appears twice in the stage network")]
    DuplicateStepKey(String),
    #[error("{steps} steps do not fit in the stage subnet {subnet}")]
    TooManySteps { steps: usize, subnet: Subnet },
    #[error("step `{key}`: port 0 in portBindings (host and container ports must be 1-65535)")]
    PortZero { key: String },
    #[error("host port {port} is bound by both step `{first}` and step `{second}`")]
    HostPortTwice {
        port: u16,
        first: String,
        second: String,
    },
    #[error(
        "steps `{first}` and `{second}` both use port {port}: in pod mode (KubernetesDirect) \
         all steps share one network namespace, so they would collide as in a Pod \
         (use `--network bridge` to give each step its own)"
    )]
    PodPortCollision {
        port: u16,
        first: String,
        second: String,
    },
    #[error(
        "host steps `{first}` and `{second}` both use port {port}: steps without an image run \
         side by side on the build machine, as on Harness's VM runner, so they would collide \
         (give one another port, or an image to run in a container of its own)"
    )]
    MachinePortCollision {
        port: u16,
        first: String,
        second: String,
    },
}

/// How the steps of a stage share the network, as Harness infrastructures do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Cloud, Docker and VM infrastructure: every step has its own network namespace
    /// and address on a private bridge; steps call each other by identifier.
    Bridge,
    /// KubernetesDirect infrastructure: all steps share one network namespace, as the
    /// containers of a Pod do; `localhost:PORT` reaches every service.
    Pod,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Pod => "pod",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkMode {
    type Err = NetPlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bridge" => Ok(NetworkMode::Bridge),
            "pod" => Ok(NetworkMode::Pod),
            _ => Err(NetPlanError::UnknownMode(s.to_string())),
        }
    }
}

/// An IPv4 network: `network/prefix_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    /// The subnet every stage network uses. It lives only inside the run's own network
    /// namespaces, so two runs (or the host) using the same numbers never meet.
    pub const DEFAULT: Subnet = Subnet {
        network: Ipv4Addr::new(10, 213, 0, 0),
        prefix_len: 16,
    };

    /// The `n`th address of the subnet (`n = 1` is the first host address), or `None`
    /// when it would be the broadcast address or past it.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        if n == 0 || u64::from(n) >= size - 1 {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + n))
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        };
        u32::from(addr) & mask == u32::from(self.network) & mask
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// A `portBindings` entry: connections to `host_port` on the host's loopback are
/// forwarded to `container_port` of the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortBinding {
    pub host_port: u16,
    pub container_port: u16,
}

impl From<(u16, u16)> for PortBinding {
    fn from((host_port, container_port): (u16, u16)) -> Self {
        PortBinding {
            host_port,
            container_port,
        }
    }
}

/// What the plan layer knows about one step before addresses are given out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRequest {
    /// Unique within the stage run (the executor's step key).
    pub key: String,
    /// Names other steps use for it, usually from [`step_hostnames`].
    pub hostnames: Vec<String>,
    pub port_bindings: Vec<PortBinding>,
    /// A host step (no image). On Harness's VM and local runners those run on the build
    /// machine itself, so they share one namespace and address ("the machine"):
    /// `localhost:PORT` from one reaches a service another started.
    pub on_machine: bool,
}

/// One step's place on the stage network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepEndpoint {
    pub key: String,
    /// Names that resolve to `address` (as given, plus lowercase spellings for
    /// resolvers that compare case-sensitively); ambiguous or invalid names are left
    /// out and listed in [`NetworkPlan::skipped_names`].
    pub hostnames: Vec<String>,
    pub address: Ipv4Addr,
    pub port_bindings: Vec<PortBinding>,
    /// A host step, in the machine's namespace shared by every host step of the stage.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub on_machine: bool,
}

/// Why a requested name does not resolve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SkipReason {
    /// Two or more steps (case-insensitively) asked for the name.
    Ambiguous { keys: Vec<String> },
    /// Not usable as a hostname (empty, too long, or characters other than letters,
    /// digits, `_`, `-`, `.`).
    Invalid { key: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedName {
    pub name: String,
    #[serde(flatten)]
    pub reason: SkipReason,
}

/// The whole network of a stage run, decided up front.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkPlan {
    pub mode: NetworkMode,
    pub subnet: Subnet,
    /// Bridge mode: the bridge's own address (the port proxy dials from it).
    /// Pod mode: unused by steps; kept for symmetry.
    pub gateway: Ipv4Addr,
    pub steps: Vec<StepEndpoint>,
    pub skipped_names: Vec<SkippedName>,
    /// Outbound connections allowed (`--network egress`); off unless the caller sets it.
    pub egress: bool,
}

impl NetworkPlan {
    pub fn step(&self, key: &str) -> Option<&StepEndpoint> {
        self.steps.iter().find(|s| s.key == key)
    }

    /// The stage's network namespaces, one per address: in pod mode all steps share
    /// one, in bridge mode host steps share the machine's and each container step has
    /// its own.
    pub fn namespaces(&self) -> Namespaces {
        let mut by_address: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        let mut first_step = Vec::new();
        let of_step = (self.steps.iter().enumerate())
            .map(|(i, s)| {
                *by_address.entry(s.address).or_insert_with(|| {
                    first_step.push(i);
                    first_step.len() - 1
                })
            })
            .collect();
        Namespaces {
            of_step,
            first_step,
        }
    }

    /// The machine's endpoint: the first host step's, when the stage has host steps.
    pub fn machine(&self) -> Option<&StepEndpoint> {
        self.steps.iter().find(|s| s.on_machine)
    }
}

/// Which namespace each step of a [`NetworkPlan`] runs in ([`NetworkPlan::namespaces`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespaces {
    /// For step `i`, the index of its namespace.
    pub of_step: Vec<usize>,
    /// For namespace `n`, the index of its first step (which names it in messages).
    pub first_step: Vec<usize>,
}

/// The names a step answers to, by Harness's rules: its identifier, and inside a step
/// group also `GroupId_StepId`.
pub fn step_hostnames(identifier: &str, group: Option<&str>) -> Vec<String> {
    let mut names = vec![identifier.to_string()];
    if let Some(group) = group {
        names.push(format!("{group}_{identifier}"));
    }
    names
}

/// Longest name glibc and musl accept from /etc/hosts without surprises.
const MAX_NAME_LEN: usize = 253;

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Give every step its address and decide which names resolve to it.
///
/// Bridge mode: each step gets the next host address of the subnet from host 2 on (host
/// 1 is the gateway), except host steps, which all share the machine's: the address of
/// the first one. Pod mode: every step gets the one shared address (host 2). Names that
/// would mean two addresses are left out (resolving them would silently pick one) and
/// listed in `skipped_names`; names that mean one address (pod mode, host steps) stay.
pub fn allocate(mode: NetworkMode, steps: &[StepRequest]) -> Result<NetworkPlan, NetPlanError> {
    let subnet = Subnet::DEFAULT;
    let gateway = subnet.host(1).expect("default subnet has a first host");

    let mut seen_keys: BTreeMap<&str, ()> = BTreeMap::new();
    for step in steps {
        if seen_keys.insert(&step.key, ()).is_some() {
            return Err(NetPlanError::DuplicateStepKey(step.key.clone()));
        }
    }
    check_ports(mode, steps)?;

    // Addresses first: bridge mode gives each step the next host address, except that
    // every host step shares the machine's (the first host step's).
    let mut addresses = Vec::with_capacity(steps.len());
    let mut next = 2u32;
    let mut machine: Option<Ipv4Addr> = None;
    for step in steps {
        let shared = match mode {
            NetworkMode::Pod => Some(subnet.host(2)),
            NetworkMode::Bridge if step.on_machine => machine.map(Some),
            NetworkMode::Bridge => None,
        };
        let address = match shared {
            Some(a) => a,
            None => {
                next += 1;
                subnet.host(next - 1)
            }
        }
        .ok_or(NetPlanError::TooManySteps {
            steps: steps.len(),
            subnet,
        })?;
        if step.on_machine && machine.is_none() {
            machine = Some(address);
        }
        addresses.push(address);
    }

    // Who asked for each name (by address), compared case-insensitively as DNS does.
    let mut claims: BTreeMap<String, Vec<(&str, Ipv4Addr)>> = BTreeMap::new();
    let mut skipped_names = Vec::new();
    for (step, &address) in steps.iter().zip(&addresses) {
        let mut own: Vec<String> = Vec::new();
        for name in &step.hostnames {
            if !valid_hostname(name) {
                skipped_names.push(SkippedName {
                    name: name.clone(),
                    reason: SkipReason::Invalid {
                        key: step.key.clone(),
                    },
                });
                continue;
            }
            let folded = name.to_ascii_lowercase();
            if !own.contains(&folded) {
                own.push(folded);
            }
        }
        for folded in own {
            claims.entry(folded).or_default().push((&step.key, address));
        }
    }
    // A name is ambiguous when it would mean two addresses (two host steps asking for
    // one name both mean the machine).
    let ambiguous =
        |claimants: &[(&str, Ipv4Addr)]| claimants.iter().any(|(_, a)| *a != claimants[0].1);
    for (name, claimants) in &claims {
        if ambiguous(claimants) {
            skipped_names.push(SkippedName {
                name: name.clone(),
                reason: SkipReason::Ambiguous {
                    keys: claimants.iter().map(|(k, _)| k.to_string()).collect(),
                },
            });
        }
    }
    let resolvable = |name: &str| {
        claims
            .get(&name.to_ascii_lowercase())
            .is_some_and(|claimants| !ambiguous(claimants))
    };

    let mut endpoints = Vec::with_capacity(steps.len());
    for (step, address) in steps.iter().zip(addresses) {
        let mut hostnames: Vec<String> = Vec::new();
        for name in &step.hostnames {
            if !valid_hostname(name) || !resolvable(name) {
                continue;
            }
            for spelling in [name.clone(), name.to_ascii_lowercase()] {
                if !hostnames.contains(&spelling) {
                    hostnames.push(spelling);
                }
            }
        }
        endpoints.push(StepEndpoint {
            key: step.key.clone(),
            hostnames,
            address,
            port_bindings: step.port_bindings.clone(),
            on_machine: step.on_machine,
        });
    }

    Ok(NetworkPlan {
        mode,
        subnet,
        gateway,
        steps: endpoints,
        skipped_names,
        egress: false,
    })
}

/// Host ports must be unique across the stage; in pod mode container ports too, because
/// two services binding one port in a shared namespace collide as they do in a Pod; and
/// so do host steps' ports, which share the build machine's namespace.
fn check_ports(mode: NetworkMode, steps: &[StepRequest]) -> Result<(), NetPlanError> {
    let mut host_ports: BTreeMap<u16, &str> = BTreeMap::new();
    let mut pod_ports: BTreeMap<u16, &str> = BTreeMap::new();
    let mut machine_ports: BTreeMap<u16, &str> = BTreeMap::new();
    for step in steps {
        for binding in &step.port_bindings {
            if binding.host_port == 0 || binding.container_port == 0 {
                return Err(NetPlanError::PortZero {
                    key: step.key.clone(),
                });
            }
            if let Some(first) = host_ports.insert(binding.host_port, &step.key) {
                return Err(NetPlanError::HostPortTwice {
                    port: binding.host_port,
                    first: first.to_string(),
                    second: step.key.clone(),
                });
            }
            let shared = match mode {
                NetworkMode::Pod => Some(&mut pod_ports),
                NetworkMode::Bridge if step.on_machine => Some(&mut machine_ports),
                NetworkMode::Bridge => None,
            };
            if let Some(taken) = shared {
                match taken.get(&binding.container_port) {
                    Some(first) if *first != step.key => {
                        let (port, first, second) =
                            (binding.container_port, first.to_string(), step.key.clone());
                        return Err(match mode {
                            NetworkMode::Pod => NetPlanError::PodPortCollision {
                                port,
                                first,
                                second,
                            },
                            NetworkMode::Bridge => NetPlanError::MachinePortCollision {
                                port,
                                first,
                                second,
                            },
                        });
                    }
                    _ => {
                        taken.insert(binding.container_port, &step.key);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, names: &[&str], ports: &[(u16, u16)]) -> StepRequest {
        StepRequest {
            key: key.to_string(),
            hostnames: names.iter().map(|n| n.to_string()).collect(),
            port_bindings: ports.iter().map(|&p| p.into()).collect(),
            on_machine: false,
        }
    }

    #[test]
    fn hostnames_follow_harness_step_group_rule() {
        assert_eq!(step_hostnames("db", None), vec!["db"]);
        assert_eq!(
            step_hostnames("cache", Some("Services")),
            vec!["cache", "Services_cache"]
        );
    }

    fn host(key: &str, ports: &[(u16, u16)]) -> StepRequest {
        StepRequest {
            on_machine: true,
            ..req(key, &[key], ports)
        }
    }

    #[test]
    fn host_steps_share_the_machine_address_and_namespace() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[
                host("svc", &[(9000, 8000)]),
                req("db", &["db"], &[]),
                host("build", &[]),
                req("web", &["web"], &[]),
            ],
        )
        .unwrap();
        let addresses: Vec<Ipv4Addr> = plan.steps.iter().map(|s| s.address).collect();
        assert_eq!(
            addresses,
            [2, 3, 2, 4].map(|n| Ipv4Addr::new(10, 213, 0, n)).to_vec()
        );
        let namespaces = plan.namespaces();
        assert_eq!(namespaces.of_step, vec![0, 1, 0, 2]);
        assert_eq!(namespaces.first_step.len(), 3);
        assert_eq!(namespaces.first_step, vec![0, 1, 3]);
        assert_eq!(plan.machine().map(|m| m.key.as_str()), Some("svc"));
        // Both names mean the machine: neither is ambiguous.
        assert_eq!(plan.steps[2].hostnames, vec!["build"]);
        assert!(plan.skipped_names.is_empty());
        // A name two host steps ask for means the machine too.
        let both = allocate(
            NetworkMode::Bridge,
            &[
                host("a", &[]),
                StepRequest {
                    hostnames: vec!["a".into()],
                    ..host("b", &[])
                },
            ],
        )
        .unwrap();
        assert!(both.skipped_names.is_empty());
        assert_eq!(both.steps[1].hostnames, vec!["a"]);
    }

    #[test]
    fn host_steps_cannot_share_a_port() {
        let err = allocate(
            NetworkMode::Bridge,
            &[host("a", &[(9000, 8000)]), host("b", &[(9001, 8000)])],
        )
        .unwrap_err();
        assert_eq!(
            err,
            NetPlanError::MachinePortCollision {
                port: 8000,
                first: "a".into(),
                second: "b".into()
            }
        );
        // Container steps each have their own namespace.
        allocate(
            NetworkMode::Bridge,
            &[
                req("a", &[], &[(9000, 8000)]),
                req("b", &[], &[(9001, 8000)]),
            ],
        )
        .unwrap();
    }

    #[test]
    fn bridge_mode_gives_each_step_its_own_address() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[req("db", &["db"], &[]), req("web", &["web"], &[(8080, 80)])],
        )
        .unwrap();
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(plan.steps[0].address, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(plan.steps[1].address, Ipv4Addr::new(10, 213, 0, 3));
        assert_eq!(
            plan.steps[1].port_bindings,
            vec![PortBinding::from((8080, 80))]
        );
        assert!(plan.skipped_names.is_empty());
    }

    #[test]
    fn addresses_cross_octet_boundaries_and_stop_at_subnet_end() {
        let many: Vec<StepRequest> = (0..300).map(|i| req(&format!("s{i}"), &[], &[])).collect();
        let plan = allocate(NetworkMode::Bridge, &many).unwrap();
        assert_eq!(plan.steps[254].address, Ipv4Addr::new(10, 213, 1, 0));
        let subnet = Subnet::DEFAULT;
        assert_eq!(subnet.host(65535), None, "broadcast is not a host");
        assert_eq!(subnet.host(65534), Some(Ipv4Addr::new(10, 213, 255, 254)));
        assert_eq!(subnet.host(0), None, "the network address is not a host");
        assert!(subnet.contains(plan.steps[299].address));
        assert!(!subnet.contains(Ipv4Addr::new(10, 214, 0, 1)));
    }

    #[test]
    fn too_many_steps_is_an_error() {
        // Hosts 2..=65534 are for steps: 65533 fit, one more does not.
        let mut many: Vec<StepRequest> = (0..65533)
            .map(|i| req(&format!("s{i}"), &[], &[]))
            .collect();
        assert!(allocate(NetworkMode::Bridge, &many).is_ok());
        many.push(req("one_more", &[], &[]));
        let err = allocate(NetworkMode::Bridge, &many).err();
        assert!(
            matches!(err, Some(NetPlanError::TooManySteps { steps: 65534, .. })),
            "{err:?}"
        );
    }

    #[test]
    fn pod_mode_shares_one_address() {
        let plan = allocate(
            NetworkMode::Pod,
            &[req("db", &["db"], &[]), req("app", &["app", "db"], &[])],
        )
        .unwrap();
        assert_eq!(plan.steps[0].address, plan.steps[1].address);
        assert_eq!(plan.steps[1].hostnames, vec!["app", "db"]);
        assert!(plan.skipped_names.is_empty());
    }

    #[test]
    fn mixed_case_names_get_a_lowercase_spelling() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[req("cache", &["Cache", "SG_Cache"], &[])],
        )
        .unwrap();
        assert_eq!(
            plan.steps[0].hostnames,
            vec!["Cache", "cache", "SG_Cache", "sg_cache"]
        );
    }

    #[test]
    fn ambiguous_names_are_left_out_in_bridge_mode() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[
                req("a/build", &["build", "A_build"], &[]),
                req("b/build", &["Build", "B_Build"], &[]),
            ],
        )
        .unwrap();
        assert_eq!(plan.steps[0].hostnames, vec!["A_build", "a_build"]);
        assert_eq!(plan.steps[1].hostnames, vec!["B_Build", "b_build"]);
        assert_eq!(
            plan.skipped_names,
            vec![SkippedName {
                name: "build".into(),
                reason: SkipReason::Ambiguous {
                    keys: vec!["a/build".into(), "b/build".into()]
                }
            }]
        );
    }

    #[test]
    fn invalid_names_are_skipped_with_the_step_named() {
        let plan = allocate(
            NetworkMode::Bridge,
            &[req("x", &["ok", "bad name", "-x", ""], &[])],
        )
        .unwrap();
        assert_eq!(plan.steps[0].hostnames, vec!["ok"]);
        let skipped: Vec<&str> = plan.skipped_names.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(skipped, vec!["bad name", "-x", ""]);
    }

    #[test]
    fn duplicate_keys_and_ports_are_errors_naming_both_steps() {
        let err = allocate(
            NetworkMode::Bridge,
            &[req("a", &[], &[]), req("a", &[], &[])],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "step key `a` appears twice in the stage network"
        );

        let err = allocate(
            NetworkMode::Bridge,
            &[
                req("pg1", &[], &[(5432, 5432)]),
                req("pg2", &[], &[(5432, 5433)]),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("host port 5432"), "{err}");
        assert!(
            err.to_string().contains("`pg1`") && err.to_string().contains("`pg2`"),
            "{err}"
        );

        // Same container port in two steps: fine with a bridge, a collision in a pod.
        let steps = [
            req("pg1", &[], &[(15432, 5432)]),
            req("pg2", &[], &[(25432, 5432)]),
        ];
        allocate(NetworkMode::Bridge, &steps).unwrap();
        let err = allocate(NetworkMode::Pod, &steps).unwrap_err();
        assert!(
            matches!(err, NetPlanError::PodPortCollision { port: 5432, .. }),
            "{err}"
        );

        let err = allocate(NetworkMode::Bridge, &[req("z", &[], &[(0, 80)])]).unwrap_err();
        assert!(matches!(err, NetPlanError::PortZero { .. }));
    }

    #[test]
    fn mode_parses_case_insensitively() {
        assert_eq!("Pod".parse::<NetworkMode>().unwrap(), NetworkMode::Pod);
        assert_eq!(
            "bridge".parse::<NetworkMode>().unwrap(),
            NetworkMode::Bridge
        );
        assert!("host".parse::<NetworkMode>().is_err());
    }
}
