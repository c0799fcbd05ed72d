//! Where a command runs: the embedded engine on this machine (the default), or a
//! `thaw serve` over HTTP (`--server URL` or `THAW_SERVER`). Both return the engine's own
//! types, so every command prints the same either way.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use thaw_platform::engine::{ExecResult, Invocation, RunOptions, TemplateRecord};
use thaw_platform::live::{KillReport, KilledBy, LiveSandbox};
use thaw_platform::progress::Progress;
use thaw_platform::session::{Session, SessionOptions};
use thaw_platform::Engine;
use thaw_protocol::Stream;

// One per process, never moved in a loop: the size difference is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Local(Engine),
    Remote(thaw_api::Client),
}

impl Backend {
    pub async fn deploy(&self, dir: &Path, progress: &dyn Progress) -> Result<TemplateRecord> {
        Ok(match self {
            Backend::Local(e) => e.deploy(dir, progress).await?,
            Backend::Remote(c) => {
                progress.step("uploading the template directory");
                c.deploy_dir(dir).await?
            }
        })
    }

    pub async fn templates(&self) -> Result<Vec<TemplateRecord>> {
        Ok(match self {
            Backend::Local(e) => e.templates()?,
            Backend::Remote(c) => c.templates().await?,
        })
    }

    pub async fn remove_template(&self, name: &str) -> Result<TemplateRecord> {
        Ok(match self {
            Backend::Local(e) => e.remove_template(name)?,
            Backend::Remote(c) => c.remove_template(name).await?,
        })
    }

    pub async fn invoke(
        &self,
        template: &str,
        payload: serde_json::Value,
        opts: RunOptions,
        on_stderr: impl FnMut(&[u8]) + Send,
    ) -> Result<Invocation> {
        Ok(match self {
            Backend::Local(e) => e.invoke(template, payload, opts, on_stderr).await?,
            Backend::Remote(c) => {
                c.invoke_stream(template, &invoke_body(payload, &opts), on_stderr)
                    .await?
            }
        })
    }

    pub async fn exec(
        &self,
        template: &str,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        opts: RunOptions,
        on_output: impl FnMut(Stream, &[u8]) + Send,
    ) -> Result<ExecResult> {
        Ok(match self {
            Backend::Local(e) => e.exec(template, argv, stdin, opts, on_output).await?,
            Backend::Remote(c) => {
                c.exec_stream(template, &exec_body(argv, stdin, &opts), on_output)
                    .await?
            }
        })
    }

    /// The embedded engine has no daemon to enforce session timeouts, so it does so before
    /// each session command; a server does it on its own schedule.
    pub async fn enforce_timeouts(&self) -> Result<()> {
        if let Backend::Local(e) = self {
            e.enforce_session_timeouts().await?;
        }
        Ok(())
    }

    pub async fn session_create(&self, template: &str, opts: SessionOptions) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session_create(template, opts).await?,
            Backend::Remote(c) => {
                c.session_create(&thaw_api::SessionCreateBody {
                    template: template.to_string(),
                    idle_timeout_s: Some(opts.idle_timeout.as_secs()),
                    max_lifetime_s: Some(opts.max_lifetime.as_secs()),
                    on_timeout: Some(opts.on_timeout),
                    checkpointable: Some(opts.checkpointable),
                    env: opts.env,
                    allow_out: opts.network.allow_out,
                    deny_out: opts.network.deny_out,
                    secrets: opts.secrets,
                })
                .await?
            }
        })
    }

    pub async fn sessions(&self) -> Result<Vec<Session>> {
        Ok(match self {
            Backend::Local(e) => e.sessions()?,
            Backend::Remote(c) => c.sessions().await?,
        })
    }

    pub async fn session(&self, id: &str) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session(id)?,
            Backend::Remote(c) => c.session(id).await?,
        })
    }

    pub async fn session_exec(
        &self,
        id: &str,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        opts: RunOptions,
        on_output: impl FnMut(Stream, &[u8]) + Send,
    ) -> Result<ExecResult> {
        Ok(match self {
            Backend::Local(e) => e.session_exec(id, argv, stdin, opts, on_output).await?,
            Backend::Remote(c) => {
                c.session_exec_stream(id, &exec_body(argv, stdin, &opts), on_output)
                    .await?
            }
        })
    }

    pub async fn session_invoke(
        &self,
        id: &str,
        payload: serde_json::Value,
        opts: RunOptions,
        on_stderr: impl FnMut(&[u8]) + Send,
    ) -> Result<Invocation> {
        Ok(match self {
            Backend::Local(e) => e.session_invoke(id, payload, opts, on_stderr).await?,
            Backend::Remote(c) => {
                c.session_invoke_stream(id, &invoke_body(payload, &opts), on_stderr)
                    .await?
            }
        })
    }

    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<()> {
        match self {
            Backend::Local(e) => e.session_write_file(id, path, data, mode).await?,
            Backend::Remote(c) => c.session_write_file(id, path, data, mode).await?,
        }
        Ok(())
    }

    pub async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        Ok(match self {
            Backend::Local(e) => e.session_read_file(id, path).await?,
            Backend::Remote(c) => c.session_read_file(id, path).await?,
        })
    }

    pub async fn pause(&self, id: &str) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session_pause(id).await?,
            Backend::Remote(c) => c.session_pause(id).await?,
        })
    }

    pub async fn resume(&self, id: &str) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session_resume(id).await?,
            Backend::Remote(c) => c.session_resume(id).await?,
        })
    }

    pub async fn extend(
        &self,
        id: &str,
        idle: Option<Duration>,
        lifetime: Option<Duration>,
    ) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session_extend(id, idle, lifetime)?,
            Backend::Remote(c) => {
                c.session_extend(
                    id,
                    &thaw_api::ExtendBody {
                        idle_timeout_s: idle.map(|d| d.as_secs()),
                        max_lifetime_s: lifetime.map(|d| d.as_secs()),
                    },
                )
                .await?
            }
        })
    }

    pub async fn delete_session(&self, id: &str) -> Result<Session> {
        Ok(match self {
            Backend::Local(e) => e.session_delete(id).await?,
            Backend::Remote(c) => c.session_delete(id).await?,
        })
    }
}

impl Backend {
    pub async fn ps(&self) -> Result<Vec<LiveSandbox>> {
        Ok(match self {
            Backend::Local(e) => {
                let e = e.clone();
                tokio::task::spawn_blocking(move || e.live_sandboxes()).await??
            }
            Backend::Remote(c) => c.sandboxes().await?,
        })
    }

    pub async fn kill(&self, id: &str) -> Result<KillReport> {
        Ok(match self {
            Backend::Local(e) => e.kill(id, &KilledBy::local()).await?,
            Backend::Remote(c) => c.kill(id).await?,
        })
    }

    pub async fn kill_all(&self, key: Option<&str>) -> Result<Vec<KillReport>> {
        Ok(match self {
            Backend::Local(e) => {
                let e = match key {
                    Some(k) => e.as_owner(k),
                    None => e.clone(),
                };
                e.kill_all(&KilledBy::local()).await?
            }
            Backend::Remote(c) => c.kill_all(key).await?,
        })
    }
}

fn timeout_ms(opts: &RunOptions) -> Option<u64> {
    opts.timeout.map(|d| d.as_millis() as u64)
}

fn invoke_body(payload: serde_json::Value, opts: &RunOptions) -> thaw_api::InvokeBody {
    thaw_api::InvokeBody {
        payload,
        env: opts.env.clone(),
        timeout_ms: timeout_ms(opts),
        allow_out: opts.network.allow_out.clone(),
        deny_out: opts.network.deny_out.clone(),
        secrets: opts.secrets.clone(),
    }
}

fn exec_body(argv: Vec<String>, stdin: Option<Vec<u8>>, opts: &RunOptions) -> thaw_api::ExecBody {
    use base64::Engine as _;
    thaw_api::ExecBody {
        argv,
        stdin_b64: stdin.map(|s| base64::engine::general_purpose::STANDARD.encode(s)),
        env: opts.env.clone(),
        timeout_ms: timeout_ms(opts),
        allow_out: opts.network.allow_out.clone(),
        deny_out: opts.network.deny_out.clone(),
        secrets: opts.secrets.clone(),
    }
}
