//! End-to-end tests of the relay against both simulators on random ports.

mod check;
mod config;
mod delivery;
mod health;
mod helpers;
mod ingest;
mod notify;
mod restart;
mod shutdown;
