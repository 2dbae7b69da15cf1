//! Reading `tabbyctl ipam show`'s table, as the lab's tests and benches do.

/// The `IPS IN USE` count of the first `IP Pool` row of `tabbyctl ipam
/// show` output (`| IP Pool | 10.244.0.0/16 | 65536 | 4 (0%) | … |`).
pub fn pool_in_use(show: &str) -> Option<u64> {
    let row = show.lines().find(|l| l.contains("| IP Pool"))?;
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // ["", "IP Pool", CIDR, total, "4 (0%)", free, ""]
    cells.get(4)?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_use_cell_of_the_pool_row_is_read_and_a_table_without_one_gives_none() {
        let show = "+----------+---------------+-----------+------------+--------------+\n\
                    | GROUPING |     CIDR      | IPS TOTAL | IPS IN USE |   IPS FREE   |\n\
                    +----------+---------------+-----------+------------+--------------+\n\
                    | IP Pool  | 10.244.0.0/16 |     65536 | 4 (0%)     | 65532 (100%) |\n\
                    +----------+---------------+-----------+------------+--------------+\n";
        assert_eq!(pool_in_use(show), Some(4));
        assert_eq!(pool_in_use("no pools\n"), None);
    }
}
