"""Reading a finished or running run: its summary and experiment table, rendered as a rich
table, TSV or JSON."""
