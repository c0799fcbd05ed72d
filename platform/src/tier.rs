//! Which isolation tier runs a template, and why.
//!
//! A template asks for `auto`, `container` or `microvm` (`tier` in template.toml; the
//! `THAW_TIER` environment variable overrides `auto` for a whole installation). The choice is
//! resolved once, at publish time, and recorded with the template: its snapshot only makes
//! sense on the tier that took it, and sessions keep the tier of the template they came from.

use crate::error::{Error, Result};

/// Environment variable that replaces `auto` for every template of this installation.
pub const TIER_ENV: &str = "THAW_TIER";

// TierChoice and Tier are in thaw-types (types/src/tier.rs).
pub use thaw_types::tier::{Tier, TierChoice};

/// Resolves a template's choice against this host. `env` is `THAW_TIER`'s value;
/// `microvm` says whether the microvm tier works here (`Err` carries every reason).
pub fn resolve(
    choice: TierChoice,
    env: Option<&str>,
    microvm: impl FnOnce() -> std::result::Result<(), String>,
) -> Result<Tier> {
    let choice = match (choice, env) {
        (TierChoice::Auto, Some(v)) if !v.is_empty() => {
            v.parse::<TierChoice>()
                .map_err(|why| Error::MissingDependency {
                    what: format!("a valid {TIER_ENV} ({why})"),
                    fix: format!("set {TIER_ENV} to auto, container or microvm, or unset it"),
                })?
        }
        (c, _) => c,
    };
    match choice {
        TierChoice::Container => Ok(Tier::Container),
        TierChoice::Auto => Ok(if microvm().is_ok() {
            Tier::Microvm
        } else {
            Tier::Container
        }),
        TierChoice::Microvm => match microvm() {
            Ok(()) => Ok(Tier::Microvm),
            Err(why) => Err(Error::MissingDependency {
                what: format!("the microvm tier (the template asks for `tier = \"microvm\"`): {why}"),
                fix: "run on a host with Cloud Hypervisor and hardware KVM (README: Running on a KVM host), or set `tier = \"auto\"` to fall back to containers".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn yes() -> std::result::Result<(), String> {
        Ok(())
    }
    fn no() -> std::result::Result<(), String> {
        Err("cloud-hypervisor not found on PATH".into())
    }

    #[test]
    fn auto_follows_the_host() {
        assert_eq!(resolve(TierChoice::Auto, None, yes).unwrap(), Tier::Microvm);
        assert_eq!(
            resolve(TierChoice::Auto, None, no).unwrap(),
            Tier::Container
        );
    }

    #[test]
    fn explicit_choices_win_over_the_environment() {
        assert_eq!(
            resolve(TierChoice::Container, Some("microvm"), yes).unwrap(),
            Tier::Container
        );
        assert_eq!(
            resolve(TierChoice::Auto, Some("container"), yes).unwrap(),
            Tier::Container
        );
        assert_eq!(
            resolve(TierChoice::Auto, Some("microvm"), yes).unwrap(),
            Tier::Microvm
        );
    }

    #[test]
    fn microvm_where_impossible_names_the_cause_and_the_fix() {
        let e = resolve(TierChoice::Microvm, None, no)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cloud-hypervisor not found"), "{e}");
        assert!(e.contains("KVM host"), "{e}");
        let e = resolve(TierChoice::Auto, Some("vm"), yes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("THAW_TIER"), "{e}");
    }

    #[test]
    fn records_without_a_tier_are_container_templates() {
        #[derive(Deserialize)]
        struct Old {
            #[serde(default)]
            tier: Tier,
        }
        let o: Old = serde_json::from_str("{}").unwrap();
        assert_eq!(o.tier, Tier::Container);
    }
}
