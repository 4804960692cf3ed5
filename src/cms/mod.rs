//! The OpenSim-CMS 1.1 API (`../shared/specs/opensim-cms-api.md`).
//!
//! `client` speaks HTTP (login, token refresh, chat POST and GET, avatar lookup); `wire` holds the
//! lenient DTOs and the text rules of the stock database, read with `lenient` (JSON read without
//! building what is not kept); `error` classifies failures so callers never match strings. Nothing
//! here knows about the viewer or the outbox.

pub mod client;
pub mod error;
mod lenient;
pub mod wire;

pub use client::CmsClient;
pub use error::CmsError;
pub use wire::{ChatItem, CmsChat};
