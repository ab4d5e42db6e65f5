//! Alarms (NOSPACE, CORRUPT) as replicated state, with etcd's semantics: a member
//! raises or clears an alarm through raft, every member records it, and while any
//! NOSPACE alarm is active writes that would grow the store are refused with
//! `etcdserver: mvcc: database space exceeded` until an operator disarms it.
//!
//! A CORRUPT alarm refuses every write that changes keys or leases, with
//! `etcdserver: corrupt cluster`.
//!
//! Records: `meta` key `alarm/<member id as 16 hex digits>/<alarm type>`, empty value.

use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;

use pontoon_proto::etcdserverpb::alarm_request::AlarmAction;
use pontoon_proto::etcdserverpb::{AlarmMember, AlarmRequest, AlarmResponse, AlarmType};

use super::{MvccStore, CF_META};
use crate::error::Result;

const PREFIX: &str = "alarm/";

fn key(member: u64, alarm: i32) -> String {
    format!("{PREFIX}{member:016x}/{alarm}")
}

impl MvccStore {
    /// Every active alarm.
    pub fn alarms(&self) -> Result<Vec<AlarmMember>> {
        let cf = self.cf(CF_META);
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek(PREFIX.as_bytes());
        let mut out = Vec::new();
        while it.valid() {
            let k = it.key().expect("valid iterator has a key");
            let Some(rest) = k.strip_prefix(PREFIX.as_bytes()) else {
                break;
            };
            let text = String::from_utf8_lossy(rest);
            if let Some((m, a)) = text.split_once('/') {
                if let (Ok(member_id), Ok(alarm)) = (u64::from_str_radix(m, 16), a.parse()) {
                    out.push(AlarmMember { member_id, alarm });
                }
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// True while a NOSPACE alarm is active (cached; refreshed when alarms change).
    pub fn no_space(&self) -> bool {
        self.no_space.load(Ordering::Acquire)
    }

    /// True while a CORRUPT alarm is active (cached).
    pub fn corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    pub(crate) fn refresh_alarm_cache(&self) -> Result<()> {
        let alarms = self.alarms()?;
        let has = |t: AlarmType| alarms.iter().any(|a| a.alarm == t as i32);
        self.no_space
            .store(has(AlarmType::Nospace), Ordering::Release);
        self.corrupt
            .store(has(AlarmType::Corrupt), Ordering::Release);
        Ok(())
    }

    /// Applies an Alarm request as etcd does: GET lists (one type, or all for NONE);
    /// ACTIVATE / DEACTIVATE answer with the alarm only if it changed.
    pub(super) fn apply_alarm(
        &self,
        req: &AlarmRequest,
        batch: &mut WriteBatch,
    ) -> Result<AlarmResponse> {
        let meta = self.cf(CF_META);
        let current = self.alarms()?;
        let this = AlarmMember {
            member_id: req.member_id,
            alarm: req.alarm,
        };
        let mut alarms = Vec::new();
        match AlarmAction::try_from(req.action).unwrap_or(AlarmAction::Get) {
            AlarmAction::Get => {
                alarms = current
                    .into_iter()
                    .filter(|a| req.alarm == AlarmType::None as i32 || a.alarm == req.alarm)
                    .collect();
            }
            AlarmAction::Activate => {
                if req.alarm != AlarmType::None as i32 && !current.contains(&this) {
                    batch.put_cf(meta, key(req.member_id, req.alarm), []);
                    alarms.push(this);
                }
            }
            AlarmAction::Deactivate => {
                if current.contains(&this) {
                    batch.delete_cf(meta, key(req.member_id, req.alarm));
                    alarms.push(this);
                }
            }
        }
        Ok(AlarmResponse {
            header: None,
            alarms,
        })
    }
}
