//! End-to-end tests of the relay against both simulators on random ports.

mod config;
mod delivery;
mod helpers;
mod ingest;
mod inworld;
mod quirks;
mod restart;
mod shutdown;
