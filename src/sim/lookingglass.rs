//! Simulated LookingGlass viewer.
