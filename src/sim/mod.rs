//! Simulators of the two peers.
