//! One attack, from the guest's side: run it, note what the device did (the value of
//! its check), then prove that ferrio and the other devices survived: the attacked
//! device is reset (status reads 0) and serves one good request, and the bystander
//! disk still reads back what it held. One check per attack; the [`Tally`] counts them.

use super::bystander::Bystander;
use crate::report::Reporter;

/// What the guest saw during an attack, and whether that is an acceptable reaction
/// (an error status, the chain returned unanswered, DEVICE_NEEDS_RESET, a refused
/// register write... whatever the attack expects; never silence or a dead device).
pub struct Seen {
    pub ok: bool,
    pub text: String,
}

impl Seen {
    pub fn new(ok: bool, text: impl Into<String>) -> Seen {
        Seen {
            ok,
            text: text.into(),
        }
    }
}

/// A device under attack.
pub trait Victim {
    /// After attack number `n`: the status the attack left (in the text), a reset
    /// that must read back 0, and one good request that must succeed.
    fn recover(&mut self, n: u64) -> Result<String, String>;
}

/// Attacks run and survived, in order.
#[derive(Debug, Default)]
pub struct Tally {
    pub attacks: Vec<(String, bool)>,
}

impl Tally {
    pub fn survived(&self) -> usize {
        self.attacks.iter().filter(|(_, ok)| *ok).count()
    }
}

/// Everything an attack reports to.
pub struct Arena<'r> {
    pub r: &'r mut Reporter,
    pub tally: Tally,
    pub bystander: Bystander,
}

impl Arena<'_> {
    /// Runs attack `name` on `victim`: `f` does it and says what it saw; then the
    /// victim recovers and the bystander is checked. One check named `name`.
    pub fn attack<V: Victim + ?Sized>(
        &mut self,
        name: &str,
        victim: &mut V,
        f: impl FnOnce(&mut V) -> Result<Seen, String>,
    ) {
        let n = self.tally.attacks.len() as u64;
        let seen = f(victim).unwrap_or_else(|e| Seen::new(false, format!("attack failed: {e}")));
        let recovered = victim.recover(n);
        let bystander = self.bystander.spot_check();
        let ok = seen.ok && recovered.is_ok() && bystander.is_ok();
        let value = format!(
            "{} | after: {} | bystander {}",
            seen.text,
            recovered.unwrap_or_else(|e| format!("RECOVERY FAILED: {e}")),
            bystander.map_or_else(|e| format!("FAILED: {e}"), |()| "ok".into()),
        );
        self.r.check(name, ok, value);
        self.tally.attacks.push((name.to_owned(), ok));
    }

    /// Reports a check that is not an attack (set-up, hand-over).
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        let ok = result.is_ok();
        self.r.check_result(name, result);
        ok
    }
}
