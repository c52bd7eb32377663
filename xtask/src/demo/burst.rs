//! Step 4: bff's load doubles past what recall's v1 pods take. With the seed's policy as it is,
//! calls queue at the pods and p99 climbs; with the mesh's annotations on the seed's
//! DestinationRule (latency-aware balancing and adaptive concurrency, the seed's "smooth
//! limiting") the excess is shed at once and the admitted calls' p99 stays near the steady one.
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use super::{
    Demo, expect,
    load::{Load, Spec},
    topology::{self, NS, SERVICE_MS, V1, WORKERS},
    watch,
};

const STEADY: f64 = 100.0;
const BURST: f64 = 200.0;
/// Calls in flight at most: enough that the client keeps its pace while calls queue.
const CONCURRENCY: u32 = 256;

/// The seed's DestinationRule with the mesh's annotations (and without its `loadBalancer`,
/// which peak-ewma replaces).
fn protected_rule() -> anyhow::Result<String> {
    let dr = topology::seed("destination-rules.yaml")?;
    let (name, lb) = ("  name: recall\nspec:\n", "    loadBalancer:\n      simple: LEAST_REQUEST\n");
    if !dr.contains(name) || !dr.contains(lb) {
        bail!("deploy/examples/lemo-dev/destination-rules.yaml changed: expected `name: recall` followed by `spec:`, and `loadBalancer: {{simple: LEAST_REQUEST}}`");
    }
    let annotations = "  name: recall\n  annotations:\n    mesh.io/load-balancer: peak-ewma\n    mesh.io/adaptive-concurrency: \"on\"\nspec:\n";
    Ok(dr.replacen(name, annotations, 1).replacen(lb, "", 1))
}

fn phase(d: &mut Demo, label: &str, rate: f64, seconds: f64) -> anyhow::Result<Value> {
    let load = Load::start(d, Spec { from: "bff-0", label, rate, duration: Duration::from_secs_f64(seconds), concurrency: CONCURRENCY, headers: &[] })?;
    load.run_out(d)
}

fn ms(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN) / 1000.0
}

fn describe(v: &Value) -> String {
    let shed = v["not_ok"].as_u64().unwrap_or(0);
    format!(
        "{} calls, p50 {:.1} ms, p99 of the answered {:.1} ms, {shed} not answered OK (HTTP {}, gRPC {}, errors {})",
        v["requests"],
        ms(v, "ok_p50_us"),
        ms(v, "ok_p99_us"),
        v["by_status"],
        v["by_grpc_status"],
        v["errors"]
    )
}

pub fn burst(d: &mut Demo) -> anyhow::Result<()> {
    let capacity = V1.len() as u32 * WORKERS * 1000 / SERVICE_MS;
    d.view.say(&format!(
        "\n[4/5] A burst: bff-0's load doubles, {STEADY:.0} -> {BURST:.0} calls/s for 4 s, past what the v1 pods take ({capacity} calls/s).\n      With the mesh's annotations on the seed's DestinationRule (the seed's \"smooth limiting\"): latency-aware balancing\n      (mesh.io/load-balancer: peak-ewma) and adaptive concurrency (mesh.io/adaptive-concurrency: \"on\") shed the excess at once."
    ));
    let steady_s = 3.0 * d.scale.max(1.0);
    d.c.apply_config("destination-rules.yaml", &protected_rule()?)?;
    d.view.say("  applied: the seed's DestinationRule + mesh.io/load-balancer: peak-ewma, mesh.io/adaptive-concurrency: \"on\"");
    let steady = phase(d, "bff-0 steady, mesh annotations", STEADY, steady_s + 1.0)?;
    let limited = phase(d, "bff-0 2x burst, mesh annotations", BURST, 4.0)?;
    let clusters = d.c.meshctl(0, &["-o", "json", "clusters"])?;
    let clusters: Value = serde_json::from_slice(&clusters.stdout).unwrap_or(Value::Null);
    let v1 = &clusters[format!("outbound|{}|v1|recall.{NS}.svc.cluster.local", topology::PORT).as_str()];
    let estimates: Vec<String> = v1["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{} {:.1} ms", e["pod"].as_str().unwrap_or("?").trim_start_matches("lemo-dev/"), e["latency_estimate_ms"].as_f64().unwrap_or(f64::NAN)))
        .collect();
    d.view.say(&format!(
        "  mesh annotations, steady: {}\n  mesh annotations, 2x burst: {}; shed answers p50 {:.2} ms\n  node-a's limiter: limit {}, min RTT {} ms; peak-ewma latency estimates: {}",
        describe(&steady),
        describe(&limited),
        ms(&limited, "not_ok_answers_p50_us"),
        v1["adaptive_concurrency"]["limit"],
        v1["adaptive_concurrency"]["min_rtt_ms"],
        estimates.join(", ")
    ));
    watch::hint(d, &[(0, "-o json clusters", "balancer state: latency estimates, the adaptive concurrency limit")]);

    // The same burst with the seed's policy as it is, for comparison.
    d.c.apply_config("destination-rules.yaml", &topology::seed("destination-rules.yaml")?)?;
    d.view.say("  for comparison, the seed's DestinationRule as it is (LEAST_REQUEST, no limit), the same burst:");
    phase(d, "bff-0 steady, seed policy", STEADY, steady_s)?;
    let open = phase(d, "bff-0 2x burst, seed policy", BURST, 4.0)?;
    let (open_p99, ok_p99, steady_p99) = (ms(&open, "ok_p99_us"), ms(&limited, "ok_p99_us"), ms(&steady, "ok_p99_us"));
    d.view.say(&format!(
        "  seed policy, 2x burst: {}\n  p99 of the answered calls in the burst: {ok_p99:.0} ms with the mesh's annotations (steady: {steady_p99:.0} ms), {open_p99:.0} ms without",
        describe(&open)
    ));
    expect(limited["not_ok"].as_u64().unwrap_or(0) > 0, || format!("nothing was shed in the burst past capacity: {}", describe(&limited)))?;
    expect(ok_p99 <= 3.0 * steady_p99, || format!("the admitted calls' p99 in the burst ({ok_p99:.1} ms) is above 3x the steady p99 ({steady_p99:.1} ms)"))?;
    expect(open_p99 >= 2.0 * ok_p99, || format!("the burst did not queue without the limit: p99 {open_p99:.1} ms vs {ok_p99:.1} ms with it"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_yaml::Value;

    #[test]
    fn the_protected_rule_is_the_seeds_with_the_annotations_and_without_its_load_balancer() {
        let dr: Value = serde_yaml::from_str(&super::protected_rule().unwrap()).unwrap();
        let seed: Value = serde_yaml::from_str(&crate::demo::topology::seed("destination-rules.yaml").unwrap()).unwrap();
        let annotations = &dr["metadata"]["annotations"];
        assert_eq!(annotations["mesh.io/load-balancer"], Value::from("peak-ewma"));
        assert_eq!(annotations["mesh.io/adaptive-concurrency"], Value::from("on"));
        let policy = dr["spec"]["trafficPolicy"].as_mapping().unwrap();
        assert!(!policy.contains_key("loadBalancer"), "{policy:?}");
        let mut seed_policy = seed["spec"]["trafficPolicy"].as_mapping().unwrap().clone();
        seed_policy.remove("loadBalancer");
        assert_eq!(*policy, seed_policy, "the rest of the seed's policy unchanged");
        assert_eq!(dr["spec"]["subsets"], seed["spec"]["subsets"]);
    }
}
