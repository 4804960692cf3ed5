//! Tests of the simulators themselves.

mod cms;
mod cms_cost;
mod viewer;
mod viewer_presence;
