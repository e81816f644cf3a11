"""Reports read from run folders: the local leaderboard (``kagglecmr runs``) and the HTML report (``kagglecmr report``)."""
