//! End-to-end tests of the relay against both simulators on random ports.

mod admin;
mod bad_input;
mod check;
mod cms_load;
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
mod notify;
mod outage;
mod quirks;
mod restart;
mod shutdown;
mod visible;
