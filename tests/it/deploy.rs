//! The deployment files: Kubernetes manifests valid against the 1.31 API schemas (kubernetes-validate from
//! PyPI, installed by .ci/run into target/tools), with the probes, scrape annotations and secrets the
//! operations guide expects; a multi-stage Dockerfile with a small, non-root runtime.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    let validator = root().join("target/tools/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "kubernetes-validate is missing: python3 -m venv target/tools && target/tools/bin/pip install kubernetes-validate==1.31.0 (.ci/run does)"
    );
    let manifests: Vec<String> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    assert!(manifests.len() >= 3, "{manifests:?}");
    let output = Command::new(&validator)
        .args(["--strict", "-k", "1.31.0"])
        .args(&manifests)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    for resource in [
        "deployment/activekg-api",
        "deployment/activekg-worker",
        "service/activekg-api",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{text}"
        );
    }
}

#[test]
fn both_deployments_probe_readiness_and_health_expose_metrics_and_take_secrets_from_a_secret() {
    for (file, port) in [
        ("deploy/k8s/activekg-api.yaml", "8000"),
        ("deploy/k8s/activekg-worker.yaml", "9090"),
    ] {
        let manifest = read(file);
        for needle in [
            "path: /readyz",
            "path: /health",
            "prometheus.io/scrape: \"true\"",
            &format!("prometheus.io/port: \"{port}\""),
            "secretRef:\n                name: activekg-secrets",
            "runAsNonRoot: true",
        ] {
            assert!(manifest.contains(needle), "{file} lacks {needle:?}");
        }
        // No secret value is written into a deployment.
        for secret in ["ADMIN_TOKEN", "ACTIVEKG_DSN", "CONNECTOR_KEK_V1"] {
            assert!(
                !manifest.contains(&format!("name: {secret}")),
                "{file} sets {secret} inline"
            );
        }
    }
    let secrets = read("deploy/k8s/activekg-secrets.example.yaml");
    for secret in ["ADMIN_TOKEN", "ACTIVEKG_DSN", "CONNECTOR_KEK_V1"] {
        assert!(secrets.contains(secret));
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_the_binary_unprivileged_on_a_slim_base() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        stages.last().unwrap().contains("-slim"),
        "the runtime image is slim: {stages:?}"
    );
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").unwrap()..];
    for needle in [
        "COPY --from=build",
        "USER 10001",
        "ENTRYPOINT [\"/usr/local/bin/activekg\"]",
        "EXPOSE 8000 9090",
        "EMBEDDING_MODEL_DIR=",
    ] {
        assert!(
            runtime.contains(needle),
            "the runtime stage lacks {needle:?}"
        );
    }
    assert!(
        !runtime.contains("cargo") && !runtime.contains("build-essential"),
        "no toolchain in the runtime image"
    );
    assert!(dockerfile.contains("--locked"), "the build uses Cargo.lock");
    let ignored = read(".dockerignore");
    assert!(
        ignored.contains("target/"),
        "the build context leaves target/ out"
    );
}
