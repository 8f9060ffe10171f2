//! The server's integration tests, each file a module of this one test
//! binary, so that the server and `common` are linked and compiled once
//! rather than once a file. `cargo test -p hanlin-server --test server
//! wechat::` runs one file's tests.

mod common;

mod api;
mod audio;
mod batch;
mod images;
mod openai_client;
mod postgres_outage;
mod search;
mod security;
mod tools;
mod upstream;
mod web;
mod wechat;
