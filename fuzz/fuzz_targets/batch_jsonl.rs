//! The Batch API's input-file check on arbitrary bytes, for each endpoint:
//! the lines to run or OpenAI-shaped errors, never a panic.
#![no_main]

use hanlin_accounts::{Caller, Plan, Role, User, UserStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let user = User {
        id: "u".into(),
        name: "fuzz".into(),
        role: Role::User,
        plan: "free".into(),
        created_at: 0,
        status: UserStatus::Active,
    };
    let plan = Plan {
        name: "free".into(),
        requests_per_minute: 60,
        tokens_per_minute: 100_000,
        tokens_per_day: 1_000_000,
        max_context: 8192,
        models: vec!["*".into()],
        priority: 0,
        max_n: 4,
        price_milli: 1000,
        file_bytes: 1 << 30,
        batch_price_milli: 500,
    };
    let caller = Caller::web(user, plan);
    for endpoint in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let _ = hanlin_server::batch::validate(data, endpoint, &caller, 64 << 10);
    }
});
