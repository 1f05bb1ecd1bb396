"""The credit ledger: grants, and deductions for what runs used."""
