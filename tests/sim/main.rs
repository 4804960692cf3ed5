//! Tests of the simulators themselves.

mod cms;
mod viewer;
