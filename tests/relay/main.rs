//! End-to-end tests of the relay against both simulators on random ports.

mod admin;
mod bad_input;
mod check;
mod config;
mod crash;
mod delivery;
mod disk_full;
mod faults;
mod health;
mod helpers;
mod hostile_cms;
mod ingest;
mod inworld;
mod mixed_faults;
mod moderation;
mod notify;
mod outage;
mod privacy;
mod quirks;
mod reload;
mod restart;
mod shutdown;
mod viewer_bounds;
mod viewer_contract;
mod visible;
