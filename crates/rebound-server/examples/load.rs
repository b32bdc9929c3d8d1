//! Load generator for bench/server.sh: N simulated agents enrol and heartbeat
//! every `interval` seconds, while a reader issues `reads` GET requests per
//! second, for `duration` seconds, against one configuration server on
//! loopback. Prints p50/p99/max latencies. Bounded in count and time.
//!
//! load URL ADMIN_TOKEN REGISTRATION_KEY [AGENTS] [INTERVAL_S] [READS_PER_S] [DURATION_S]

use rebound_api::{
    AgentFacts, ComponentRole, Credentials, Enrolment, Heartbeat, NewSite, SiteRole,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn report(name: &str, lat: &Mutex<Vec<f64>>, errors: usize) {
    let mut v = lat.lock().map(|g| g.clone()).unwrap_or_default();
    let n = v.len();
    let (p50, p99, max) = (pct(&mut v, 0.5), pct(&mut v, 0.99), pct(&mut v, 1.0));
    println!(
        "{name:<11} requests {n:>6}  errors {errors:>4}  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  max {max:>7.2} ms"
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        anyhow::bail!(
            "usage: load URL ADMIN_TOKEN REGISTRATION_KEY [AGENTS] [INTERVAL_S] [READS_PER_S] [DURATION_S]"
        );
    }
    let base = format!("{}/api/v1", args[1].trim_end_matches('/'));
    let admin = args[2].clone();
    let key = args[3].clone();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (agents, interval, reads, duration) = (num(4, 1000), num(5, 10), num(6, 20), num(7, 60));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;

    http.post(format!("{base}/sites"))
        .bearer_auth(&admin)
        .json(&NewSite {
            name: "bench".into(),
            role: SiteRole::Primary,
        })
        .send()
        .await?;
    let mut creds: Vec<Credentials> = Vec::with_capacity(agents as usize);
    for i in 0..agents {
        let c: Credentials = http
            .post(format!("{base}/enrol"))
            .json(&Enrolment {
                registration_key: key.clone(),
                role: ComponentRole::Agent,
                name: format!("bench-agent-{i}-{}", std::process::id()),
                site: "bench".into(),
                version: "bench".into(),
            })
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        creds.push(c);
    }
    println!(
        "enrolled {agents} agents; {agents} heartbeats every {interval} s + {reads} reads/s for {duration} s"
    );

    let end = Instant::now() + Duration::from_secs(duration);
    let hb_lat = Arc::new(Mutex::new(Vec::new()));
    let rd_lat = Arc::new(Mutex::new(Vec::new()));
    let hb_err = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rd_err = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, c) in creds.into_iter().enumerate() {
        let (http, base, lat, err) = (http.clone(), base.clone(), hb_lat.clone(), hb_err.clone());
        let offset = Duration::from_millis(interval * 1000 * i as u64 / agents.max(1));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(Duration::from_secs(interval));
            while Instant::now() < end {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                let hb = Heartbeat {
                    version: "bench".into(),
                    agent: Some(AgentFacts {
                        machine: format!("vm{i}"),
                        running: true,
                        suspended: false,
                        sync_barrier: None,
                        sync_barrier_ns: None,
                        replication: None,
                    }),
                    ..Default::default()
                };
                let t0 = Instant::now();
                let r = http
                    .post(format!("{base}/components/{}/heartbeat", c.component_id))
                    .bearer_auth(&c.token)
                    .json(&hb)
                    .send()
                    .await;
                let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                if let Ok(resp) = r {
                    let _ = resp.bytes().await;
                }
                if ok {
                    if let Ok(mut l) = lat.lock() {
                        l.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                } else {
                    err.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    {
        let (http, base, lat, err, admin) = (
            http.clone(),
            base.clone(),
            rd_lat.clone(),
            rd_err.clone(),
            admin.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let paths = [
                "/items",
                "/sites",
                "/jobs?limit=50",
                "/policies",
                "/components?role=master_target",
            ];
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / reads.max(1) as f64));
            let mut n = 0usize;
            while Instant::now() < end {
                tick.tick().await;
                let (http, base, lat, err, admin) = (
                    http.clone(),
                    base.clone(),
                    lat.clone(),
                    err.clone(),
                    admin.clone(),
                );
                let path = paths[n % paths.len()];
                n += 1;
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r = http
                        .get(format!("{base}{path}"))
                        .bearer_auth(&admin)
                        .send()
                        .await;
                    let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                    if let Ok(resp) = r {
                        let _ = resp.bytes().await;
                    }
                    if ok {
                        if let Ok(mut l) = lat.lock() {
                            l.push(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                    } else {
                        err.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    report(
        "heartbeats",
        &hb_lat,
        hb_err.load(std::sync::atomic::Ordering::Relaxed),
    );
    report(
        "reads",
        &rd_lat,
        rd_err.load(std::sync::atomic::Ordering::Relaxed),
    );
    let mut all: Vec<f64> = hb_lat.lock().map(|g| g.clone()).unwrap_or_default();
    all.extend(rd_lat.lock().map(|g| g.clone()).unwrap_or_default());
    report("all", &Mutex::new(all), 0);
    Ok(())
}
