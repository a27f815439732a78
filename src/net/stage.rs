//! The live network of one stage run, built from its [`NetworkPlan`].
//!
//! Bridge mode: each container step has its own namespace with `lo` and `eth0` at its
//! planned address, and host steps share one, the machine's, as on a build machine
//! where they all run side by side. A hub namespace joins them as a router: one
//! `vethN` per step namespace (the peer of its `eth0`) holding the gateway address,
//! a route to each step's address through its veth, and forwarding on; each step
//! reaches the stage subnet through the gateway (its address carries no route of its
//! own to the subnet: `noprefixroute`). It is a router rather than a bridge (`br0`): when a network namespace goes,
//! the kernel removes each port of a bridge in it with an expedited RCU grace period
//! while it holds the global RTNL lock, and every namespace being made on the machine
//! meanwhile waits for that lock (docs/performance.md: stalls of 100-300 ms when
//! stage networks are made one after another). There is no route out, so steps
//! reach each other and nothing else. Pod mode: one namespace shared by all steps, with the pod address on
//! `lo`, as containers of a Pod share one.
//!
//! Everything is held by descriptors ([`super::netns`]), so dropping the value (or the
//! process dying) removes the namespaces and all their links; the only on-disk state
//! is the per-step files under `<state_dir>/net`, removed on teardown and replaced by
//! the next run that uses the same state directory.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;

use super::egress::Egress;
use super::error::NetError;
use super::files::{render_hosts, render_resolv_conf};
use super::links::{add_address_blocking, loopback_up_blocking, Netlink, LOOPBACK_INDEX};
use super::netns::{create_namespaces, FreshNetns, PendingFactory, SocketFactory, StepJoin};
use super::plan::{NetworkMode, NetworkPlan};

/// How long links may take to report up before the stage fails (they take well under
/// a millisecond; a host under heavy load may take longer).
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
const STEP_LINK: &str = "eth0";

struct StepNet {
    key: String,
    /// `None` in pod mode: the step uses the shared namespace.
    netns: Option<OwnedFd>,
    hosts: PathBuf,
    resolv_conf: PathBuf,
}

/// A stage run's network namespaces, links and files. Dropping it (or
/// [`StageNetwork::teardown`]) removes all of them.
pub struct StageNetwork {
    plan: NetworkPlan,
    /// `<state_dir>/net` once the step files are written.
    dir: Option<PathBuf>,
    /// The hub namespace, the stage's router (bridge mode), or the shared one (pod mode).
    hub: OwnedFd,
    steps: Vec<StepNet>,
    sockets: Arc<SocketFactory>,
    egress: Option<Egress>,
}

/// A stage network being built (see [`StageNetwork::start`]).
pub struct StartedNetwork {
    plan: NetworkPlan,
    pending: PendingFactory,
}

impl StartedNetwork {
    /// The rest of [`StageNetwork::build`]: waits for the namespace, then builds the
    /// hub's veths and routes (several steps) and egress.
    pub async fn finish(self) -> Result<StageNetwork, NetError> {
        let plan = &self.plan;
        let (sockets, hub) = self.pending.ready().await?;
        let mut network = StageNetwork {
            plan: plan.clone(),
            dir: None,
            hub: hub.ns,
            steps: plan
                .steps
                .iter()
                .map(|s| StepNet {
                    key: s.key.clone(),
                    netns: None,
                    hosts: PathBuf::new(),
                    resolv_conf: PathBuf::new(),
                })
                .collect(),
            sockets: Arc::new(sockets),
            egress: None,
        };
        // A stage with a single step gets one namespace with its address on lo (set
        // by the namespace's thread), as pod mode has: the same network seen from that
        // step and from the port proxy, without the veths that make namespace setup
        // slow on a busy kernel.
        let shared = shared(plan);
        if !shared {
            let hub_link = Netlink::new(hub.netlink).map_err(NetError::os("open netlink"))?;
            network.build_hub(&hub_link).await?;
        }
        if plan.egress {
            let targets: Vec<BorrowedFd<'_>> = match shared {
                // One per namespace (host steps share the machine's).
                false => (plan.namespaces().first_step.into_iter())
                    .filter_map(|i| network.steps[i].netns.as_ref().map(|f| f.as_fd()))
                    .collect(),
                true => vec![network.hub.as_fd()],
            };
            let egress = Egress::start(&targets).await?;
            network.egress = Some(egress);
        }
        // Earlier stages' namespaces go now, if there are many: the kernel removes them
        // while this stage runs.
        super::netns::release_past_limit();
        Ok(network)
    }
}

/// One namespace for all steps: pod mode, or a stage of a single step or of host steps
/// only (a router only pays when there are namespaces to connect).
fn shared(plan: &NetworkPlan) -> bool {
    plan.mode == NetworkMode::Pod || plan.namespaces().first_step.len() <= 1
}

impl StageNetwork {
    /// Builds the network of `plan`: namespaces, links, addresses, and each step's
    /// `hosts` and `resolv.conf` under `<state_dir>/net`. Returns once every link is
    /// up, so that no step's first packet is lost.
    pub async fn create(plan: &NetworkPlan, state_dir: &Path) -> Result<StageNetwork, NetError> {
        let mut network = StageNetwork::build(plan).await?;
        network.write_files(state_dir)?;
        Ok(network)
    }

    /// The namespaces, links and addresses of [`StageNetwork::create`], without the
    /// step files: it needs only the capabilities of the runner's namespace, so a
    /// rootless runner can build it while its id maps are still being written. Call
    /// [`StageNetwork::write_files`] before starting steps.
    pub async fn build(plan: &NetworkPlan) -> Result<StageNetwork, NetError> {
        StageNetwork::start(plan)?.finish().await
    }

    /// The first part of [`StageNetwork::build`], needing no runtime: starts the
    /// namespace's thread, which creates the namespace and sets `lo` up (with the pod
    /// address, for a shared namespace) on its own while the caller goes on.
    pub fn start(plan: &NetworkPlan) -> Result<StartedNetwork, NetError> {
        let router = !shared(plan);
        let address = match router {
            false => plan.steps.first().map(|s| s.address),
            true => None,
        };
        let pending = SocketFactory::start_in_new_netns(move |hub| {
            loopback_up_blocking(hub.netlink.as_fd())
                .map_err(NetError::os("set lo up in the stage namespace"))?;
            if let Some(address) = address {
                add_address_blocking(hub.netlink.as_fd(), LOOPBACK_INDEX, address, 32)
                    .map_err(NetError::os(format!("add address {address} to lo")))?;
            }
            if router {
                route_between_steps()?;
            }
            Ok(())
        })
        .map_err(NetError::os("start the stage namespace's thread"))?;
        Ok(StartedNetwork {
            plan: plan.clone(),
            pending,
        })
    }

    async fn build_hub(&mut self, hub: &Netlink) -> Result<(), NetError> {
        let started = Instant::now();
        // One namespace per address: host steps share the machine's. The first step of
        // each namespace names it in messages.
        let layout = self.plan.namespaces();
        let count = layout.first_step.len();
        let firsts: Vec<&crate::net::StepEndpoint> = (layout.first_step.iter())
            .map(|&i| &self.plan.steps[i])
            .collect();
        let fresh = step_namespaces(count).await?;
        tracing::debug!(namespaces = count, elapsed = ?started.elapsed(), "step namespaces created");
        let veths: Vec<String> = (0..count).map(|i| format!("veth{i}")).collect();
        let gateway = self.plan.gateway;
        try_join_all(
            firsts
                .iter()
                .zip(&fresh)
                .zip(&veths)
                .map(|((step, ns), veth)| async move {
                    let failed =
                        |what: &str| NetError::netlink(format!("{what} of step `{}`", step.key));
                    hub.add_veth_to(veth, STEP_LINK, &ns.ns)
                        .await
                        .map_err(failed("create the veth pair"))?;
                    let index = hub
                        .index_of(veth)
                        .await
                        .map_err(failed("find the veth"))?
                        .ok_or_else(|| NetError::Os {
                            what: format!("find {veth} of step `{}`", step.key),
                            source: std::io::Error::from(std::io::ErrorKind::NotFound),
                        })?;
                    hub.add_address(index, gateway, 32)
                        .await
                        .map_err(failed("add the gateway address to the veth"))?;
                    hub.add_host_route(step.address, index)
                        .await
                        .map_err(failed("route to the address"))
                }),
        )
        .await?;

        let subnet = self.plan.subnet;
        let configs = firsts.iter().zip(fresh).map(|(endpoint, ns)| async move {
            let key = &endpoint.key;
            let link = Netlink::new(ns.netlink).map_err(NetError::os("open netlink"))?;
            link.loopback_up()
                .await
                .map_err(NetError::netlink(format!("set lo up for step `{key}`")))?;
            let eth = link
                .index_of(STEP_LINK)
                .await
                .map_err(NetError::netlink(format!("find eth0 of step `{key}`")))?
                .ok_or_else(|| NetError::Os {
                    what: format!("find eth0 of step `{key}`"),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })?;
            link.add_address_routed(eth, endpoint.address, subnet.prefix_len)
                .await
                .map_err(NetError::netlink(format!(
                    "add address {} for step `{key}`",
                    endpoint.address
                )))?;
            link.set_up(eth)
                .await
                .map_err(NetError::netlink(format!("set eth0 up for step `{key}`")))?;
            link.add_subnet_route(subnet.network, subnet.prefix_len, gateway, eth)
                .await
                .map_err(NetError::netlink(format!(
                    "route the stage subnet for step `{key}`"
                )))?;
            Ok::<OwnedFd, NetError>(ns.ns)
        });
        let namespaces = try_join_all(configs).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "links and addresses configured");
        for (step, slot) in self.steps.iter_mut().zip(&layout.of_step) {
            let ns = namespaces[*slot]
                .try_clone()
                .map_err(NetError::os("duplicate a namespace descriptor"))?;
            step.netns = Some(ns);
        }

        let waiting = Instant::now();
        let down = hub
            .wait_up(&veths, LINK_UP_TIMEOUT)
            .await
            .map_err(NetError::netlink("read link states"))?;
        if !down.is_empty() {
            let keys = down
                .iter()
                .filter_map(|name| veths.iter().position(|v| v == name))
                .map(|i| firsts[i].key.clone())
                .collect();
            return Err(NetError::LinksDown {
                keys,
                waited_ms: waiting.elapsed().as_millis() as u64,
            });
        }
        tracing::debug!(elapsed = ?started.elapsed(), waited_for_links = ?waiting.elapsed(), "stage network up");
        Ok(())
    }

    /// The namespace host steps share (the build machine's, as Harness's VM runner
    /// sees it), when the stage has host steps.
    pub fn machine_netns(&self) -> Option<BorrowedFd<'_>> {
        let key = &self.plan.machine()?.key;
        self.step_netns(key).ok()
    }

    pub fn plan(&self) -> &NetworkPlan {
        &self.plan
    }

    fn step(&self, key: &str) -> Result<&StepNet, NetError> {
        self.steps
            .iter()
            .find(|s| s.key == key)
            .ok_or_else(|| NetError::UnknownStep(key.to_string()))
    }

    /// The network namespace the step `key` runs in.
    pub fn step_netns(&self, key: &str) -> Result<BorrowedFd<'_>, NetError> {
        let step = self.step(key)?;
        Ok(step.netns.as_ref().unwrap_or(&self.hub).as_fd())
    }

    /// The step's `/etc/hosts`, to be mounted into its container.
    pub fn hosts_file(&self, key: &str) -> Result<&Path, NetError> {
        Ok(&self.step(key)?.hosts)
    }

    /// The step's `/etc/resolv.conf`, to be mounted into its container.
    pub fn resolv_conf(&self, key: &str) -> Result<&Path, NetError> {
        Ok(&self.step(key)?.resolv_conf)
    }

    /// What the container helper's child does in `pre_exec`: join the step's network
    /// namespace (the container gets the files as mounts in its spec).
    pub fn container_join(&self, key: &str) -> Result<StepJoin, NetError> {
        StepJoin::netns_only(self.step_netns(key)?)
            .map_err(NetError::os("duplicate a namespace descriptor"))
    }

    /// What a host step (no image) does in `pre_exec`: join the step's network
    /// namespace and see the step's `/etc/hosts` and `/etc/resolv.conf`.
    pub fn host_join(&self, key: &str) -> Result<StepJoin, NetError> {
        let step = self.step(key)?;
        StepJoin::with_etc_files(self.step_netns(key)?, &step.hosts, &step.resolv_conf)
            .map_err(NetError::os("duplicate a namespace descriptor"))
    }

    /// Where the port proxy connects for `container_port` of step `key`: the step's
    /// address (bridge mode), or the shared loopback, as
    /// `kubectl port-forward` does in a Pod (pod mode).
    pub(crate) fn dial_target(
        &self,
        key: &str,
        container_port: u16,
    ) -> Result<SocketAddr, NetError> {
        let address = match self.plan.mode {
            NetworkMode::Bridge => {
                self.plan
                    .step(key)
                    .ok_or_else(|| NetError::UnknownStep(key.to_string()))?
                    .address
            }
            NetworkMode::Pod => Ipv4Addr::LOCALHOST,
        };
        Ok(SocketAddr::V4(SocketAddrV4::new(address, container_port)))
    }

    pub(crate) fn socket_factory(&self) -> Arc<SocketFactory> {
        self.sockets.clone()
    }

    /// Removes everything: stops egress helpers, retires the namespaces
    /// (`netns::retire`: the kernel deletes them and their links once they are
    /// closed) and deletes the files.
    pub async fn teardown(mut self) {
        if let Some(egress) = self.egress.take() {
            egress.stop().await;
        }
        // Drop does the rest.
    }
}

impl Drop for StageNetwork {
    fn drop(&mut self) {
        if let Some(egress) = self.egress.take() {
            egress.kill_now();
        }
        let steps = self.steps.iter_mut().filter_map(|s| s.netns.take());
        super::netns::retire(self.hub.try_clone().into_iter().chain(steps));
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl StageNetwork {
    /// Writes each step's `hosts` and `resolv.conf` under `<state_dir>/net`.
    pub fn write_files(&mut self, state_dir: &Path) -> Result<(), NetError> {
        let dir = state_dir.join("net");
        let files = write_files(&self.plan, &dir)?;
        self.dir = Some(dir);
        for (step, (hosts, resolv_conf)) in self.steps.iter_mut().zip(files) {
            step.hosts = hosts;
            step.resolv_conf = resolv_conf;
        }
        Ok(())
    }
}

fn write_files(plan: &NetworkPlan, dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, NetError> {
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| NetError::WriteFile {
            path: path.to_path_buf(),
            source,
        })
    };
    // Leftovers of an earlier run that used the same state directory.
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| NetError::WriteFile {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let resolv = render_resolv_conf(plan.egress.then_some(super::egress::DNS));
    let mut steps = Vec::with_capacity(plan.steps.len());
    for (i, endpoint) in plan.steps.iter().enumerate() {
        let step_dir = dir.join(format!("step{i}"));
        std::fs::create_dir_all(&step_dir).map_err(|source| NetError::WriteFile {
            path: step_dir.clone(),
            source,
        })?;
        let hosts = step_dir.join("hosts");
        let resolv_conf = step_dir.join("resolv.conf");
        write(
            &hosts,
            &render_hosts(plan, &endpoint.key).unwrap_or_default(),
        )?;
        write(&resolv_conf, &resolv)?;
        steps.push((hosts, resolv_conf));
    }
    Ok(steps)
}

/// Makes the calling thread's (new) network namespace forward between the step
/// namespaces (`/proc/sys/net` is the namespace of the thread that opens it).
fn route_between_steps() -> Result<(), NetError> {
    let setting = "/proc/sys/net/ipv4/ip_forward";
    std::fs::write(setting, "1").map_err(NetError::os(format!(
        "set {setting} in the stage namespace"
    )))
}

async fn step_namespaces(count: usize) -> Result<Vec<FreshNetns>, NetError> {
    tokio::task::spawn_blocking(move || create_namespaces(count))
        .await
        .map_err(|e| NetError::os("create step network namespaces")(std::io::Error::other(e)))?
        .map_err(NetError::os("create step network namespaces"))
}
