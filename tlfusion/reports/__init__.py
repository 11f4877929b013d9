"""What a finished run shows people: report.md, report.html and plots/ (`reports.report`), and run tracking."""
