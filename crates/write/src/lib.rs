//! `hanlin write`: data-to-text. Rows (CSV, JSONL, JSON) and a minijinja
//! template in; one Markdown article per row and language out, each fact
//! checked against its row (`check`), failures regenerated a bounded
//! number of times and then flagged, a JSONL index that makes a run
//! resumable (`run`).

pub mod article;
pub mod check;
pub mod rows;
pub mod run;

pub use article::{Article, Template};
pub use check::{Checker, Problem};
pub use rows::Row;
pub use run::{write, Entry, Generated, Generator, Plan, Report, Status};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("data: {0}")]
    Data(String),
    #[error("template: {0}")]
    Template(String),
    #[error("row {row}: no field `{field}`, which the template uses")]
    MissingField { row: usize, field: String },
    #[error("row {row}: the template fails: {message}")]
    Render { row: usize, message: String },
    #[error("output: {0}")]
    Output(String),
}
