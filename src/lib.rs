//! opensim-chat-relay: carries local chat between an OpenSim region and the OpenSim-CMS chat.
//!
//! # Layout
//! Data flows one way: the viewer's chat URL → `poller` (with `lookingglass`, `filter`) → `outbox`
//! (sled, durable) → `delivery` (with `avatars`, `backoff`) → `cms`; and back: `cms` → `inworld` →
//! the viewer's chat POST.
//!
//! - `config`: the layered `Settings`; `zone`: the peers' clocks; `model`: domain types; `text`:
//!   the body snippet the viewer client quotes in errors (the CMS client quotes through its scrub).
//! - `lookingglass`, `cms`: one module per peer, each with its client and wire format.
//! - `filter`, `avatars`, `outbox`, `poller`, `delivery`, `inworld`: the stages; `echo`: what the
//!   relay said in-world, which `inworld` and `notice` record and `poller` recognises.
//! - `privacy`: every decision on opting out, and the stored opt-outs (the stages ask it); `say`:
//!   how a text is said in-world (split, echo recorded), for `inworld` and `notice`; `notice`:
//!   what the relay says in-world on its own (the privacy notice, greetings, confirmations);
//!   `reload`: SIGHUP and the live configuration.
//! - `admin`: the `outbox` and `privacy` subcommands; `app`: builds and runs everything; `shutdown`, `telemetry`, `metrics`, `cli`: process plumbing.
//! - `health`: the operator's HTTP endpoint; `liveness`: the readiness signals and loop heartbeats
//!   it and the systemd watchdog decide on; `notify`: systemd notifications; `check`: the `check`
//!   probe of both peers.
//! - `sim`: simulators of both peers, for tests and the demo; `demo`: the one-command demo.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod avatars;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod cms;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod echo;
pub mod filter;
pub mod health;
pub mod inworld;
pub mod liveness;
pub mod lookingglass;
pub mod metrics;
pub mod model;
pub mod notice;
pub mod notify;
pub mod outbox;
pub mod pacing;
pub mod poller;
pub mod presence;
pub mod privacy;
pub mod reload;
pub mod say;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod text;
pub mod zone;
