//! Latchkey end to end: a real server on port 0, over HTTPS with its generated CA, driven
//! through real HTTP clients (and Auth0's own Python SDK, and Node). One test binary.

mod harness;

mod admin_api;
mod approvals;
mod at_rest;
mod audit;
mod audit_api;
mod audit_coverage;
mod backup;
mod bad_input;
mod catalog;
mod config_cache;
mod connected_accounts;
mod corpus;
mod crash;
mod dashboard;
mod dashboard_e2e;
mod examples;
mod health;
mod interop;
mod interop_ciba;
mod interop_node;
mod interop_server_python;
mod lifecycle;
mod login;
mod mcp;
mod oidc;
mod ops;
mod policy;
mod postgres;
mod proxy;
mod refresh;
mod ssrf;
mod walkthrough;
