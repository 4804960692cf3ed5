//! Simulators of the two peers, faithful to `../shared/specs/`: the LookingGlass viewer chat API
//! (`lookingglass`) and the OpenSim-CMS 1.1 API (`cms`), on a minimal HTTP/1.1 server of our own
//! (`http`) so that header case, never-answered requests and aborted writes can be reproduced.
//!
//! They must not use the relay's wire types: they write their own JSON from the specs, so a serde
//! mistake cannot pass on both sides.

pub mod cms;
pub mod http;
pub mod lookingglass;
