//! `rebound errors`: the table of stable error codes.

use rebound_types::ErrorCode;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// `table` (default), `json`, or `markdown` (the rows of docs/errors.md).
    #[arg(long, default_value = "table")]
    output: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.output.as_str() {
        "json" => {
            let rows: Vec<_> = ErrorCode::ALL
                .iter()
                .map(|c| serde_json::json!({"code": c.number(), "name": c.name(), "remedy": c.remedy()}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        "markdown" => {
            for c in ErrorCode::ALL {
                println!("| {} | `{}` | {} |", c.number(), c.name(), c.remedy());
            }
        }
        _ => {
            for c in ErrorCode::ALL {
                println!("{:>6}  {:<24} {}", c.number(), c.name(), c.remedy());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
