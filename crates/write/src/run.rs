//! A writing run: every (row, language) not yet in the output directory's
//! index is rendered, generated, checked, regenerated (bounded) and then
//! kept or flagged. The index line is written after the article's file,
//! so a run killed at any point resumes where it stopped.

use crate::article::{messages, Article, Template};
use crate::check::Checker;
use crate::rows::Row;
use crate::WriteError;
use hanlin_tokenizer::Message;
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

/// Attempts per article at most (the first and the regenerations).
pub const MAX_ATTEMPTS: usize = 10;

/// One model answer.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Whatever writes: the local engine, or a server.
pub trait Generator: Sync {
    /// One answer to `messages` (sampled with `seed`); an error is a
    /// failure to generate (the article is tried again on the next run).
    fn generate(&self, messages: &[Message], seed: u64) -> Result<Generated, String>;
}

/// Hears how a run goes.
pub trait Progress: Sync {
    /// `todo` articles to write now, `done` already in the index.
    fn start(&self, _todo: usize, _done: usize) {}
    fn article(&self, _entry: &Entry) {}
}

impl Progress for () {}

pub struct Plan<'a> {
    pub rows: &'a [Row],
    pub template: &'a Template,
    /// Languages (`zh`, `en`), one article per row each.
    pub langs: Vec<String>,
    pub style: String,
    pub out: PathBuf,
    /// Drafts per article at most (≥ 1; the rest are regenerations).
    pub attempts: usize,
    /// Articles generated at once.
    pub parallel: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every fact checked.
    Passed,
    /// Still failing after every attempt: kept apart, with its problems.
    Flagged,
    /// Not written (the template failed for the row, or generation did).
    Error,
}

/// One line of `index.jsonl` (errors are reported, not indexed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub row: usize,
    pub lang: String,
    pub status: Status,
    /// Drafts generated.
    pub attempts: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The article's file, relative to the output directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// What the kept draft states that the row does not (flagged only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// What the first draft got wrong (empty: it passed at once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first_problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub prompt_tokens: usize,
    #[serde(default)]
    pub completion_tokens: usize,
}

/// The run's counts (also written to `report.json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Articles of this plan in the index, and errors of this run.
    pub articles: usize,
    pub passed: usize,
    /// Passed on the first draft (the rate before regeneration).
    pub passed_first_try: usize,
    pub flagged: usize,
    pub errors: usize,
    /// passed / (passed + flagged).
    pub pass_rate: f64,
    /// passed_first_try / (passed + flagged).
    pub first_try_rate: f64,
    /// Drafts regenerated because the one before failed the check.
    pub regenerated: usize,
    /// Written by this run (the rest were in the index already).
    pub written_now: usize,
    pub resumed: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// This run's wall time.
    pub seconds: f64,
}

fn valid_lang(l: &str) -> bool {
    let mut parts = l.split('-');
    let main = parts.next().unwrap_or("");
    (2..=3).contains(&main.len())
        && main.chars().all(|c| c.is_ascii_lowercase())
        && parts.all(|p| (2..=4).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn seed_of(base: u64, id: &str, lang: &str, attempt: usize) -> u64 {
    // FNV-1a: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain([0]).chain(lang.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^ base.wrapping_add(attempt as u64 * 0x9e37_79b9_7f4a_7c15)
}

/// The index's entries (a line cut short by a kill is dropped, and cut
/// from the file so appending goes on cleanly).
fn read_index(path: &Path) -> Result<Vec<Entry>, WriteError> {
    let io = |e| WriteError::Io(path.display().to_string(), e);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io)?;
        f.set_len(whole as u64).map_err(io)?;
    }
    let mut out = Vec::new();
    for (i, line) in text[..whole].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: Entry = serde_json::from_str(line)
            .map_err(|e| WriteError::Output(format!("{} line {}: {e}", path.display(), i + 1)))?;
        out.push(e);
    }
    Ok(out)
}

/// Write `bytes` to `path` whole or not at all.
fn put(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let io = |e| WriteError::Io(path.display().to_string(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// What a worker hands back for one article.
struct Done {
    entry: Entry,
    markdown: Option<String>,
}

/// Run `plan`: write every article not yet in `plan.out/index.jsonl`.
pub fn write(
    plan: &Plan,
    generator: &dyn Generator,
    checker: &Checker,
    progress: &dyn Progress,
) -> Result<Report, WriteError> {
    let started = Instant::now();
    if plan.langs.is_empty() {
        return Err(WriteError::Data("no language to write in".into()));
    }
    if let Some(bad) = plan.langs.iter().find(|l| !valid_lang(l)) {
        return Err(WriteError::Data(format!(
            "{bad:?} is not a language code (zh, en, zh-TW …)"
        )));
    }
    if !(1..=MAX_ATTEMPTS).contains(&plan.attempts) {
        return Err(WriteError::Data(format!(
            "attempts must be 1 to {MAX_ATTEMPTS}"
        )));
    }
    std::fs::create_dir_all(&plan.out)
        .map_err(|e| WriteError::Io(plan.out.display().to_string(), e))?;
    let index_path = plan.out.join("index.jsonl");
    let wanted: HashSet<(String, String)> = plan
        .rows
        .iter()
        .flat_map(|r| plan.langs.iter().map(|l| (r.id.clone(), l.clone())))
        .collect();
    let mut entries: Vec<Entry> = read_index(&index_path)?
        .into_iter()
        .filter(|e| wanted.contains(&(e.id.clone(), e.lang.clone())))
        .collect();
    let done: HashSet<(String, String)> = entries
        .iter()
        .map(|e| (e.id.clone(), e.lang.clone()))
        .collect();
    let resumed = entries.len();
    let todo: VecDeque<(&Row, &str)> = plan
        .rows
        .iter()
        .flat_map(|r| plan.langs.iter().map(move |l| (r, l.as_str())))
        .filter(|(r, l)| !done.contains(&(r.id.clone(), l.to_string())))
        .collect();
    progress.start(todo.len(), resumed);
    let mut index = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&index_path)
        .map_err(|e| WriteError::Io(index_path.display().to_string(), e))?;

    let queue = Mutex::new(todo);
    let (tx, rx) = mpsc::channel::<Done>();
    let mut errors = Vec::new();
    let mut written_now = 0;
    let workers = plan.parallel.max(1);
    let outcome: Result<(), WriteError> = std::thread::scope(|s| {
        for _ in 0..workers {
            let tx = tx.clone();
            let queue = &queue;
            s.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((row, lang)) = next else { break };
                let done = one(plan, generator, checker, row, lang);
                if tx.send(done).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for done in rx {
            let entry = done.entry;
            if let (Some(md), Some(path)) = (&done.markdown, &entry.path) {
                put(&plan.out.join(path), md.as_bytes())?;
            }
            if entry.status == Status::Error {
                errors.push(entry.clone());
            } else {
                let mut line =
                    serde_json::to_string(&entry).map_err(|e| WriteError::Output(e.to_string()))?;
                line.push('\n');
                index
                    .write_all(line.as_bytes())
                    .and_then(|_| index.sync_data())
                    .map_err(|e| WriteError::Io(index_path.display().to_string(), e))?;
                written_now += 1;
                entries.push(entry.clone());
            }
            progress.article(&entry);
        }
        Ok(())
    });
    outcome?;

    let mut r = Report {
        written_now,
        resumed,
        errors: errors.len(),
        ..Default::default()
    };
    for e in entries.iter().chain(&errors) {
        r.articles += 1;
        r.prompt_tokens += e.prompt_tokens;
        r.completion_tokens += e.completion_tokens;
        r.regenerated += e.attempts.saturating_sub(1);
        match e.status {
            Status::Passed => {
                r.passed += 1;
                if e.attempts == 1 {
                    r.passed_first_try += 1;
                }
            }
            Status::Flagged => r.flagged += 1,
            Status::Error => {}
        }
    }
    let checked = (r.passed + r.flagged).max(1) as f64;
    r.pass_rate = r.passed as f64 / checked;
    r.first_try_rate = r.passed_first_try as f64 / checked;
    r.seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&r).map_err(|e| WriteError::Output(e.to_string()))?;
    put(&plan.out.join("report.json"), &json)?;
    Ok(r)
}

/// Write one article: draft, check, redraft with the problems named.
fn one(plan: &Plan, generator: &dyn Generator, checker: &Checker, row: &Row, lang: &str) -> Done {
    let mut entry = Entry {
        id: row.id.clone(),
        row: row.number,
        lang: lang.to_string(),
        status: Status::Error,
        attempts: 0,
        title: None,
        path: None,
        problems: Vec::new(),
        first_problems: Vec::new(),
        error: None,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let prompt = match plan.template.render(row, lang, &plan.style) {
        Ok(p) => p,
        Err(e) => {
            entry.error = Some(e.to_string());
            return Done {
                entry,
                markdown: None,
            };
        }
    };
    let mut best: Option<(Article, Vec<String>)> = None;
    let mut last: Vec<String> = Vec::new();
    for attempt in 0..plan.attempts {
        let msgs = messages(&prompt, lang, &last);
        let g = match generator.generate(&msgs, seed_of(plan.seed, &row.id, lang, attempt)) {
            Ok(g) => g,
            Err(e) => {
                entry.error = Some(format!("generation failed: {e}"));
                return Done {
                    entry,
                    markdown: None,
                };
            }
        };
        entry.attempts += 1;
        tracing::debug!(id = %row.id, lang, attempt, text = %g.text, "draft");
        entry.prompt_tokens += g.prompt_tokens;
        entry.completion_tokens += g.completion_tokens;
        let (article, problems) = match Article::parse(&g.text) {
            Some(a) => {
                let p: Vec<String> = checker
                    .check(row, &prompt, &a)
                    .iter()
                    .map(|p| p.to_string())
                    .collect();
                (Some(a), p)
            }
            None => (None, vec!["no title and body".to_string()]),
        };
        if attempt == 0 {
            entry.first_problems = problems.clone();
        }
        if let Some(a) = article {
            if best.as_ref().is_none_or(|(_, p)| problems.len() < p.len()) {
                best = Some((a, problems.clone()));
            }
        }
        if problems.is_empty() {
            break;
        }
        last = problems;
    }
    let Some((article, problems)) = best else {
        entry.error = Some(format!(
            "no article in {} drafts (each lacked a title and a body)",
            entry.attempts
        ));
        return Done {
            entry,
            markdown: None,
        };
    };
    let (status, path, markdown) = if problems.is_empty() {
        (
            Status::Passed,
            format!("{lang}/{}.md", row.id),
            article.markdown(),
        )
    } else {
        let note: String = problems
            .iter()
            .map(|p| format!("<!-- not in the data: {} -->\n", p.replace("--", "—")))
            .collect();
        (
            Status::Flagged,
            format!("flagged/{lang}/{}.md", row.id),
            format!("{note}{}", article.markdown()),
        )
    };
    entry.status = status;
    entry.title = Some(article.title);
    entry.path = Some(path);
    entry.problems = problems;
    Done {
        entry,
        markdown: Some(markdown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Writes from the prompt: the first draft of row m2 invents a
    /// minute, row m3's drafts always do.
    struct Fake {
        calls: AtomicUsize,
        fail_after: usize,
    }

    impl Generator for Fake {
        fn generate(&self, messages: &[Message], _seed: u64) -> Result<Generated, String> {
            if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
                return Err("the engine stopped".into());
            }
            let user = &messages[1].content;
            let retry = user.contains("last draft") || user.contains("上一稿");
            let facts = user.lines().next().unwrap_or("");
            let invent = (facts.contains("m2") && !retry) || facts.contains("m3");
            let body = if invent {
                format!("{facts} in the 90th minute.")
            } else {
                format!("{facts}.")
            };
            Ok(Generated {
                text: format!("Result\n\n{body}"),
                prompt_tokens: 10,
                completion_tokens: 5,
            })
        }
    }

    fn rows() -> Vec<Row> {
        (1..=4)
            .map(|n| Row {
                number: n,
                id: format!("m{n}"),
                fields: json!({"team": format!("Team{n}"), "goals": n})
                    .as_object()
                    .unwrap()
                    .clone(),
            })
            .collect()
    }

    #[test]
    fn articles_are_checked_retried_flagged_and_a_run_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rows = rows();
        rows[3].fields.remove("goals");
        let template = Template::new("{{ id }} {{ team }} scored {{ goals }}").unwrap();
        let checker = Checker::new(&rows);
        let plan = Plan {
            rows: &rows,
            template: &template,
            langs: vec!["en".into()],
            style: "news".into(),
            out: dir.path().to_path_buf(),
            attempts: 3,
            parallel: 1,
            seed: 0,
        };
        // The engine stops after four drafts: m1 (1), m2 (2) and one of m3's.
        let fake = Fake {
            calls: AtomicUsize::new(0),
            fail_after: 4,
        };
        let r = write(&plan, &fake, &checker, &()).unwrap();
        assert_eq!(
            (r.passed, r.flagged, r.errors, r.written_now),
            (2, 0, 2, 2),
            "{r:?}"
        );
        let index = std::fs::read_to_string(dir.path().join("index.jsonl")).unwrap();
        assert_eq!(index.lines().count(), 2);
        assert!(dir.path().join("en/m1.md").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("en/m2.md")).unwrap(),
            "# Result\n\nm2 Team2 scored 2.\n"
        );
        // A line cut short by a kill is dropped; the run goes on from there.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("index.jsonl"))
            .unwrap();
        f.write_all(b"{\"id\":\"m3\",\"ro").unwrap();
        let fake = Fake {
            calls: AtomicUsize::new(0),
            fail_after: usize::MAX,
        };
        let plan = Plan {
            parallel: 3,
            ..plan
        };
        let r = write(&plan, &fake, &checker, &()).unwrap();
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            3,
            "only m3 is drafted again"
        );
        assert_eq!(
            (
                r.articles,
                r.passed,
                r.passed_first_try,
                r.flagged,
                r.errors,
                r.resumed
            ),
            (4, 2, 1, 1, 1, 2),
            "{r:?}"
        );
        assert_eq!(r.regenerated, 1 + 2);
        let flagged = std::fs::read_to_string(dir.path().join("flagged/en/m3.md")).unwrap();
        assert!(
            flagged.starts_with("<!-- not in the data: number 90 -->"),
            "{flagged}"
        );
        let index: Vec<Entry> = std::fs::read_to_string(dir.path().join("index.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(index.len(), 3);
        let m2 = index.iter().find(|e| e.id == "m2").unwrap();
        assert_eq!(
            (m2.attempts, m2.first_problems.clone()),
            (2, vec!["number 90".to_string()])
        );
        // The missing field is named, and never indexed.
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(report["errors"], 1);
        assert!(write(
            &Plan {
                langs: vec!["../x".into()],
                ..plan
            },
            &fake,
            &checker,
            &()
        )
        .is_err());
    }
}
