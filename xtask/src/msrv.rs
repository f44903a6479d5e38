//! `cargo xtask msrv`: each published crate's `rust-version` is at least what every
//! dependency it builds with (on this platform, as the lock file resolves them) declares.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use serde_json::Value;

use crate::{cargo, PUBLISHED};

/// `1.85` and `1.85.0` compare equal.
fn version(v: &str) -> [u64; 3] {
    let mut out = [0; 3];
    for (slot, part) in out.iter_mut().zip(v.split('.')) {
        *slot = part.parse().unwrap_or(0);
    }
    out
}

fn host() -> Option<String> {
    let out = Command::new("rustc").arg("-vV").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
}

/// Prints one line per crate; false if a dependency needs a newer Rust than declared.
pub(crate) fn check() -> bool {
    let Some(host) = host() else {
        eprintln!("msrv: cannot read the host triple from rustc -vV");
        return false;
    };
    let out = match cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            &host,
        ])
        .output()
    {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            eprintln!(
                "msrv: cargo metadata failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return false;
        }
        Err(e) => {
            eprintln!("msrv: cargo metadata: {e}");
            return false;
        }
    };
    let meta: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("msrv: cargo metadata's output: {e}");
            return false;
        }
    };
    let empty = Vec::new();
    let packages: HashMap<&str, &Value> = meta["packages"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let mut ok = true;
    for name in PUBLISHED {
        let Some((root, pkg)) = packages
            .iter()
            .find(|(_, p)| p["name"] == name && p["source"].is_null())
        else {
            eprintln!("msrv: {name} is not in the workspace");
            ok = false;
            continue;
        };
        let declared = pkg["rust_version"].as_str().unwrap_or("none");
        // Every package the crate builds with: normal and build dependencies, transitively.
        let mut seen = HashSet::new();
        let mut stack = vec![*root];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            for d in nodes
                .get(id)
                .and_then(|n| n["deps"].as_array())
                .unwrap_or(&empty)
            {
                let kinds = d["dep_kinds"].as_array().unwrap_or(&empty);
                if kinds
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
                {
                    if let Some(p) = d["pkg"].as_str() {
                        stack.push(p);
                    }
                }
            }
        }
        seen.remove(root);
        let need = seen
            .iter()
            .filter_map(|id| {
                let p = packages.get(id)?;
                Some((p["rust_version"].as_str()?, p["name"].as_str()?))
            })
            .max_by_key(|(v, _)| version(v));
        match need {
            Some((v, dep)) if version(v) > version(declared) => {
                println!("{name}: declares rust-version {declared}, but {dep} needs {v}");
                ok = false;
            }
            Some((v, dep)) => {
                println!("{name}: rust-version {declared} (its dependencies need {v}: {dep})")
            }
            None => println!("{name}: rust-version {declared}"),
        }
    }
    ok
}
