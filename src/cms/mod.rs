//! The OpenSim-CMS 1.1 API (`../shared/specs/opensim-cms-api.md`).
//!
//! `client` speaks HTTP (login, token refresh, chat POST and GET, avatar lookup); `wire` holds the
//! lenient DTOs and the text rules of the stock database, read with `lenient` (JSON read without
//! building what is not kept); `error` classifies failures so callers never match strings; `board` shares
//! the in-world reader's chat reads with delivery. Nothing here knows about the viewer or the
//! outbox.

pub mod board;
pub mod client;
pub mod error;
mod lenient;
pub mod wire;

pub use board::ReadBoard;
pub use client::CmsClient;
pub use error::CmsError;
pub use wire::{ChatItem, CmsChat};
