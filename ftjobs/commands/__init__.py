"""The CLI's client commands (files, jobs, submit, status), each a parser and a short function that calls
ftjobs.client and prints the result: a table or lines for people, the API's own JSON with --json."""
