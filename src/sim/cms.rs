//! Simulated OpenSim-CMS 1.1.
