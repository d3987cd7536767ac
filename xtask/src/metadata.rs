//! Reads the workspace packages and their features from `cargo metadata`.

use crate::{Result, json};

/// A workspace package and the features it declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageFeatures {
    /// The package name, as `cargo -p` takes it.
    pub(crate) name: String,
    /// Declared features except `default`, in `cargo metadata` order (sorted).
    pub(crate) features: Vec<String>,
    /// Whether `default` turns anything on, so that `--no-default-features` alone
    /// is a build of its own worth checking.
    pub(crate) has_default_features: bool,
}

/// Extracts every package's features from `cargo metadata --format-version 1 --no-deps`
/// output, leaving out the packages named in `skip`.
pub(crate) fn workspace_features(metadata: &str, skip: &[&str]) -> Result<Vec<PackageFeatures>> {
    let root = json::parse(metadata).map_err(|e| format!("cannot read `cargo metadata`: {e}"))?;
    let packages = root
        .get("packages")
        .and_then(json::Value::as_array)
        .ok_or("`cargo metadata` output has no `packages` array")?;
    let mut out = Vec::new();
    for package in packages {
        let name = package
            .get("name")
            .and_then(json::Value::as_str)
            .ok_or("a package in `cargo metadata` has no `name`")?;
        if skip.contains(&name) {
            continue;
        }
        let declared = package
            .get("features")
            .and_then(json::Value::as_object)
            .ok_or_else(|| format!("package `{name}` in `cargo metadata` has no `features`"))?;
        let has_default_features = declared.iter().any(|(feature, enables)| {
            feature == "default" && enables.as_array().is_some_and(|list| !list.is_empty())
        });
        let features = declared
            .iter()
            .map(|(feature, _)| feature)
            .filter(|feature| *feature != "default")
            .cloned()
            .collect();
        out.push(PackageFeatures {
            name: name.to_owned(),
            features,
            has_default_features,
        });
    }
    Ok(out)
}

/// The names of the integration test targets (`tests/*.rs`) of every workspace package
/// whose name contains `filter`, sorted, each once, from `cargo metadata --format-version 1
/// --no-deps` output.
pub(crate) fn test_targets(metadata: &str, filter: &str) -> Result<Vec<String>> {
    let root = json::parse(metadata).map_err(|e| format!("cannot read `cargo metadata`: {e}"))?;
    let packages = root
        .get("packages")
        .and_then(json::Value::as_array)
        .ok_or("`cargo metadata` output has no `packages` array")?;
    let mut names = Vec::new();
    for package in packages {
        let targets = package
            .get("targets")
            .and_then(json::Value::as_array)
            .ok_or("a package in `cargo metadata` has no `targets`")?;
        for target in targets {
            let is_test = target
                .get("kind")
                .and_then(json::Value::as_array)
                .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("test")));
            let name = target.get("name").and_then(json::Value::as_str);
            if let Some(name) = name.filter(|name| is_test && name.contains(filter)) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::{PackageFeatures, test_targets, workspace_features};

    /// Trimmed from real `cargo metadata --format-version 1 --no-deps` output.
    const SAMPLE: &str = r#"{
      "packages": [
        {
          "name": "orchestrator",
          "version": "0.1.0",
          "id": "path+file:///work/main#orchestrator@0.1.0",
          "dependencies": [{"name": "tokio", "req": "^1", "features": ["sync", "rt"], "optional": false}],
          "features": {"default": [], "redis": ["dep:orchestrator-redis", "orchestrator-bus/redis"]},
          "manifest_path": "/work/main/Cargo.toml"
        },
        {
          "name": "orchestrator-core",
          "features": {"default": [], "testkit": ["tokio/time", "tokio/rt", "tokio/macros"]},
          "manifest_path": "/work/main/orchestrator-core/Cargo.toml"
        },
        {
          "name": "orchestrator-store",
          "features": {"default": ["file"], "file": [], "zstd": ["dep:zstd"]}
        },
        {"name": "orchestrator-bus", "features": {}},
        {"name": "xtask", "features": {"internal": []}}
      ],
      "workspace_members": ["path+file:///work/main#orchestrator@0.1.0"],
      "target_directory": "/work/main/target",
      "version": 1,
      "workspace_root": "/work/main",
      "metadata": null
    }"#;

    #[test]
    fn enumerates_features_per_package() {
        let found = workspace_features(SAMPLE, &["xtask"]);
        let expected = vec![
            PackageFeatures {
                name: "orchestrator".to_owned(),
                features: vec!["redis".to_owned()],
                has_default_features: false,
            },
            PackageFeatures {
                name: "orchestrator-core".to_owned(),
                features: vec!["testkit".to_owned()],
                has_default_features: false,
            },
            PackageFeatures {
                name: "orchestrator-store".to_owned(),
                features: vec!["file".to_owned(), "zstd".to_owned()],
                has_default_features: true,
            },
            PackageFeatures {
                name: "orchestrator-bus".to_owned(),
                features: vec![],
                has_default_features: false,
            },
        ];
        assert_eq!(found, Ok(expected));
    }

    #[test]
    fn finds_test_targets_by_name() {
        let metadata = r#"{"packages": [
          {"name": "orchestrator", "targets": [
            {"kind": ["lib"], "name": "orchestrator_kafka"},
            {"kind": ["test"], "name": "tracing_kafka"},
            {"kind": ["test"], "name": "tracing_redis"},
            {"kind": ["example"], "name": "kafka_backend"}
          ]},
          {"name": "orchestrator-backends", "targets": [
            {"kind": ["test"], "name": "kafka_store"},
            {"kind": ["bench"], "name": "kafka"}
          ]}
        ]}"#;
        let found = test_targets(metadata, "kafka");
        assert_eq!(
            found,
            Ok(vec!["kafka_store".to_owned(), "tracing_kafka".to_owned()])
        );
        assert_eq!(test_targets(metadata, "postgres"), Ok(vec![]));
        assert!(test_targets(r#"{"packages": [{"name": "a"}]}"#, "").is_err());
    }

    #[test]
    fn reports_unexpected_shapes() {
        assert!(workspace_features("{}", &[]).is_err());
        assert!(workspace_features(r#"{"packages": [{"features": {}}]}"#, &[]).is_err());
        assert!(workspace_features(r#"{"packages": [{"name": "a"}]}"#, &[]).is_err());
        assert!(workspace_features("not json", &[]).is_err());
    }
}
