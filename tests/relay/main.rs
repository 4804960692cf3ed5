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
mod ingest;
mod inworld;
mod notify;
mod outage;
mod own_disk;
mod quirks;
mod readback;
mod restart;
mod shutdown;
mod unresolved;
