"""What a run learns from besides the data: today LET's alignment hook and its colocated teacher."""
