//! The LookingGlass viewer chat interface (`../shared/specs/lookingglass-chat-api.md`).
//!
//! `client` speaks HTTP to the viewer, one request at a time, and alone sends the viewer's login
//! password (`ViewerLogin`); `wire` turns its bodies into `model` types; `facts` reads the viewer's
//! status and avatar list off the ingest and delivery paths;
//! `presence` reads the network counters, the status and the avatar list and decides whether the
//! viewer hears its region and whom it can hear.
//! Nothing here knows about the CMS or the outbox.

pub mod client;
pub mod facts;
pub mod presence;
pub mod wire;

pub use client::{ChatAnswer, LookingGlassClient, ViewerEndpoint, ViewerError, ViewerLogin};
pub use facts::{FactsReader, ViewerFacts};
