//! What several of Ferry's binaries use and none of them owns: the event recorder, leader
//! election over a Lease, label and field selectors, cron schedules, API time stamps, how a
//! binary reports its error, the API client built from a kubeconfig, and the proxy of upgraded (exec, attach, port-forward) streams.
//! Small on purpose: it depends on the Kubernetes client and types, never on a component, so
//! `ferry-kubelet` records events without linking the API server.

pub mod cron;
pub mod events;
pub mod exit;
pub mod kubeconfig;
pub mod leader;
pub mod selectors;
pub mod time;
pub mod upgrade;
