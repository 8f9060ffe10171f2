//! The settings file (`config.toml`) read into the environment.

use super::*;

/// Settings from a TOML file (`--config FILE`, `$HANLIN_CONFIG`, or
/// `config.toml` in the store directory) become `HANLIN_*` environment
/// variables unless those are already set, so precedence is: flags, then
/// environment, then the file. Keys are the long flag names with `_` or `-`
/// (`port = 8080`, `database_url = "postgres://…"`, `max_batch = 8`).
pub(crate) fn load_config_file() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `hanlin train pretrain --config RUN.toml` names a training run's
    // settings, not the server's.
    if args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--config" && !a.starts_with("--config="))
        .any(|a| a == "train")
    {
        return Ok(());
    }
    let from_flag = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(PathBuf::from))
        });
    let explicit = from_flag.or_else(|| std::env::var_os("HANLIN_CONFIG").map(PathBuf::from));
    let path = match &explicit {
        Some(p) => p.clone(),
        None => Store::default_home().join("config.toml"),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (key, value) in table {
        let var = format!("HANLIN_{}", key.to_uppercase().replace('-', "_"));
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "{}: {key} must be a string, number or boolean, not {other}",
                path.display()
            ),
        };
        if std::env::var_os(&var).is_none() {
            // SAFETY: called at start-up, before any other thread exists.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(())
}
