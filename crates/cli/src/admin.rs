//! `hanlin admin`: users, keys, plans and usage, straight on the database.

use super::*;

#[derive(Subcommand)]
pub(crate) enum AdminCmd {
    /// API keys
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Users
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Plans (rate limits, quotas, models, priority)
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Token usage by day, user and model
    Usage {
        #[arg(long)]
        user: Option<String>,
        /// YYYY-MM-DD (UTC)
        #[arg(long)]
        day: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
    /// Create a key (and the user, if needed); the key is printed alone on the last line
    Create {
        #[arg(long)]
        user: String,
        /// Plan for the user (free, plus, or one an admin made)
        #[arg(long)]
        plan: Option<String>,
        /// Make the user an admin
        #[arg(long)]
        admin: bool,
        /// A label for the key
        #[arg(long, default_value = "")]
        name: String,
        /// Limit the key to these models (comma-separated)
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Expire after this many days
        #[arg(long)]
        expires_days: Option<u32>,
    },
    /// List keys (never their secrets)
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a key by id
    Revoke { id: String },
}

#[derive(Subcommand)]
pub(crate) enum UserCmd {
    /// Create a user or change their plan / role
    Set {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    List,
    /// Create a web-app account with a password read from standard input
    /// (`--admin`: the server's administrator)
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    /// Set a user's password for the web app (read from standard input;
    /// creates the user if needed); their other sessions end
    Passwd {
        name: String,
    },
    /// Approve a pending account, or re-enable a disabled one
    Approve {
        name: String,
    },
    /// Disable an account (its sessions end, its keys are revoked)
    Disable {
        name: String,
    },
    /// Delete an account: keys, sessions, conversations and personas go;
    /// its usage stays on record
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum PlanCmd {
    List,
    /// Create or change a plan
    Set {
        name: String,
        #[arg(long)]
        rpm: i64,
        #[arg(long)]
        tpm: i64,
        #[arg(long)]
        tpd: i64,
        #[arg(long)]
        max_context: i64,
        /// Comma-separated models, or *
        #[arg(long, default_value = "*")]
        models: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// Most choices (`n`) one request may ask for
        #[arg(long, default_value_t = 4)]
        max_n: i64,
        /// What the plan's tokens count for against its limits, in
        /// thousandths (1000: each token once; 500: half)
        #[arg(long, default_value_t = 1000)]
        price_milli: i64,
        /// Bytes of files (Files API) one user may keep
        #[arg(long, default_value_t = hanlin_accounts::DEFAULT_FILE_BYTES)]
        file_bytes: i64,
        /// What batch lines cost, in thousandths of the plan's price
        #[arg(long, default_value_t = hanlin_accounts::DEFAULT_BATCH_PRICE)]
        batch_price_milli: i64,
        /// Images one user may have drawn per day (UTC)
        #[arg(long, default_value_t = hanlin_accounts::DEFAULT_IMAGES_PER_DAY)]
        images_per_day: i64,
    },
}

pub(crate) async fn admin(url: &str, cmd: AdminCmd) -> Result<()> {
    use hanlin_accounts::{Db, NewKey, Plan, Role};
    let db = Db::connect(url)
        .await
        .with_context(|| format!("opening the database {url}"))?;
    match cmd {
        AdminCmd::Key {
            cmd:
                KeyCmd::Create {
                    user,
                    plan,
                    admin,
                    name,
                    models,
                    expires_days,
                },
        } => {
            let role = if admin { Role::Admin } else { Role::User };
            let u = db.ensure_user(&user, role, plan.as_deref()).await?;
            let opts = NewKey {
                name,
                models: (!models.is_empty()).then_some(models),
                expires_at: expires_days.map(|d| hanlin_accounts::now() + i64::from(d) * 86_400),
            };
            let (key, secret) = db.create_key(&u.id, &opts).await?;
            eprintln!(
                "created key {} for {} (plan {}, role {:?}); it is shown only once:",
                key.id, u.name, u.plan, u.role
            );
            println!("{secret}");
        }
        AdminCmd::Key {
            cmd: KeyCmd::List { user },
        } => {
            let uid = match user {
                Some(n) => Some(
                    db.user_by_name(&n)
                        .await?
                        .with_context(|| format!("no user {n}"))?
                        .id,
                ),
                None => None,
            };
            println!(
                "{:<22} {:<24} {:<12} {:<8} name",
                "id", "user", "prefix", "status"
            );
            let users = db.users().await?;
            for k in db.keys(uid.as_deref()).await? {
                let owner = users
                    .iter()
                    .find(|u| u.id == k.user_id)
                    .map_or("?", |u| u.name.as_str());
                let status = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|t| t <= hanlin_accounts::now()) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<22} {:<24} {:<12} {:<8} {}",
                    k.id, owner, k.prefix, status, k.name
                );
            }
        }
        AdminCmd::Key {
            cmd: KeyCmd::Revoke { id },
        } => {
            db.revoke_key(&id).await?;
            println!("revoked {id}");
        }
        AdminCmd::User {
            cmd: UserCmd::Set { name, plan, admin },
        } => {
            let role = if admin { Role::Admin } else { Role::User };
            let u = db.ensure_user(&name, role, plan.as_deref()).await?;
            println!("{} {:?} plan {}", u.name, u.role, u.plan);
        }
        AdminCmd::User {
            cmd: UserCmd::Passwd { name },
        } => {
            use std::io::BufRead;
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            db.ensure_user(&name, Role::User, None).await?;
            db.set_password(&name, password).await?;
            println!("password set for {name}");
        }
        AdminCmd::User {
            cmd: UserCmd::Create { name, plan, admin },
        } => {
            use std::io::BufRead;
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            let role = if admin { Role::Admin } else { Role::User };
            if db.user_by_name(&name).await?.is_some() {
                anyhow::bail!("a user {name:?} exists already (use `hanlin admin user passwd`)");
            }
            let u = db
                .register(&name, password, role, hanlin_accounts::UserStatus::Active)
                .await?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(p) = plan {
                db.ensure_user(&u.name, role, Some(&p)).await?;
            }
            println!("created {} ({})", u.name, role.as_str());
        }
        AdminCmd::User {
            cmd: UserCmd::Approve { name },
        } => {
            let u = db
                .set_user_status(&name, hanlin_accounts::UserStatus::Active)
                .await?;
            println!("{} is active", u.name);
        }
        AdminCmd::User {
            cmd: UserCmd::Disable { name },
        } => {
            let u = db
                .set_user_status(&name, hanlin_accounts::UserStatus::Disabled)
                .await?;
            println!(
                "{} is disabled; their sessions ended and keys were revoked",
                u.name
            );
        }
        AdminCmd::User {
            cmd: UserCmd::Delete { name },
        } => {
            db.delete_user(&name).await?;
            println!("{name} deleted; their usage stays on record");
        }
        AdminCmd::User { cmd: UserCmd::List } => {
            for u in db.users().await? {
                println!(
                    "{:<24} {:<6} {:<10} {}",
                    u.name,
                    u.role.as_str(),
                    u.plan,
                    u.status.as_str()
                );
            }
        }
        AdminCmd::Plan { cmd: PlanCmd::List } => {
            println!(
                "{:<10} {:>6} {:>9} {:>11} {:>8} {:>8} {:>10} models",
                "plan", "rpm", "tpm", "tpd", "context", "priority", "images/day"
            );
            for p in db.plans().await? {
                println!(
                    "{:<10} {:>6} {:>9} {:>11} {:>8} {:>8} {:>10} {}",
                    p.name,
                    p.requests_per_minute,
                    p.tokens_per_minute,
                    p.tokens_per_day,
                    p.max_context,
                    p.priority,
                    p.images_per_day,
                    p.models.join(",")
                );
            }
        }
        AdminCmd::Plan {
            cmd:
                PlanCmd::Set {
                    name,
                    rpm,
                    tpm,
                    tpd,
                    max_context,
                    models,
                    priority,
                    max_n,
                    price_milli,
                    file_bytes,
                    batch_price_milli,
                    images_per_day,
                },
        } => {
            let plan = Plan {
                name,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                tokens_per_day: tpd,
                max_context,
                models: models.split(',').map(|m| m.trim().to_string()).collect(),
                priority,
                max_n,
                price_milli,
                file_bytes,
                batch_price_milli,
                images_per_day,
            };
            db.put_plan(&plan).await?;
            println!("plan {} saved", plan.name);
        }
        AdminCmd::Usage { user, day, json } => {
            let rows = db.usage(user.as_deref(), day.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<10} {:<20} {:<22} {:>8} {:>10} {:>10} {:>10}",
                    "day", "user", "model", "requests", "prompt", "cached", "completion"
                );
                for r in rows {
                    println!(
                        "{:<10} {:<20} {:<22} {:>8} {:>10} {:>10} {:>10}",
                        r.day,
                        r.user,
                        r.model,
                        r.requests,
                        r.prompt_tokens,
                        r.cached_tokens,
                        r.completion_tokens
                    );
                }
            }
        }
    }
    Ok(())
}

/// A model argument: an existing file, a pulled model, or a catalog name (pulled now).
pub(crate) fn resolve(store: &Store, model: &str) -> Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.is_file() || p.join("config.json").is_file() {
        return Ok(p);
    }
    if model.ends_with(".gguf")
        || model.contains(std::path::MAIN_SEPARATOR) && !model.starts_with("hf:")
    {
        bail!("model file {model} does not exist");
    }
    let name = match model.strip_prefix("hf:") {
        Some(spec) => hanlin_store::hf::HfFile::parse(spec)?.local_name(),
        None => model.to_string(),
    };
    if let Some(p) = store.path_of(&name)? {
        return Ok(p);
    }
    if model.starts_with("hf:") || catalog().iter().any(|e| e.name == model) {
        eprintln!("{model} is not in the store yet; fetching it…");
    }
    let m = store.pull(model, true)?;
    Ok(store.blob_path(&m.sha256))
}

pub(crate) fn load(store: &Store, model: &str, threads: usize) -> Result<Arc<LoadedModel>> {
    let path = resolve(store, model)?;
    LoadedModel::load(&path, threads).with_context(|| format!("loading {model}"))
}
