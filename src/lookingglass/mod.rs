//! The LookingGlass viewer chat interface (`../shared/specs/lookingglass-chat-api.md`).
//!
//! `client` speaks HTTP to the viewer; `wire` turns its bodies into `model` types. Nothing here knows
//! about the CMS or the outbox.

pub mod client;
pub mod wire;

pub use client::{LookingGlassClient, ViewerError};
